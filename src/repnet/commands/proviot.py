"""``repnet proviot``: on-device provenance anomaly detection (ProvIoT), trained on the device and
federated on Flower: ``collect`` / ``train`` / ``detect`` / ``federated`` (repnet.proviot)."""
from __future__ import annotations

import argparse
import json
import sys

from repnet.errors import RepnetError
from repnet.commands.flags import add_overwrite_flag

HELP = "ProvIoT: provenance anomaly detection trained on the device (collect / train / detect / federated)"
#: Output arguments per subcommand (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
SUBCOMMAND_OUTPUTS = {"collect": {"out": "file"}, "train": {"out": "run"}, "detect": {"json": "file"},
                      "federated": {"out": "run", "flower_app": "folder"}}
#: Every output argument of any subcommand (what the parser declares).
OUTPUTS = {dest: kind for outs in SUBCOMMAND_OUTPUTS.values() for dest, kind in outs.items()}


def outputs(args: argparse.Namespace) -> dict[str, str]:
    return SUBCOMMAND_OUTPUTS.get(getattr(args, "proviot_command", None), {})


def _detector_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedding", default="hash", choices=("hash", "doc2vec"),
                   help="path embedding: hash (feature hashing, default) or doc2vec (PV-DM, gensim)")
    p.add_argument("--k", type=int, default=10, help="rarest paths per window (default: 10)")
    p.add_argument("--max-len", type=int, default=6, help="edges per path at most (default: 6)")
    p.add_argument("--epochs", type=int, default=60, help="autoencoder epochs (default: 60)")
    p.add_argument("--batch-size", type=int, default=32, help="autoencoder batch size (default: 32)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--path-quantile", type=float, default=0.85,
                   help="path threshold: this quantile of held-out benign path errors (ProvIoT: 0.85)")
    p.add_argument("--window-quantile", type=float, default=1.0,
                   help="window threshold: this quantile of held-out benign window scores (default: 1.0)")
    p.add_argument("--margin", type=float, default=1.5,
                   help="window threshold = the quantile's score x this margin (default: 1.5)")
    p.add_argument("--seed", type=int, default=0)


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="proviot_command", metavar="SUBCOMMAND", parser_class=type(p))
    c = sub.add_parser("collect", help="trace a command (or a PID, or a device session) into a trace file")
    c.add_argument("--out", required=True, help="the trace file to write (JSON)")
    c.add_argument("--collector", default="strace", choices=("strace", "auditd"))
    c.add_argument("--pid", type=int, help="trace this running process instead of a command")
    c.add_argument("--seconds", type=float, default=10.0, help="with --pid: how long to trace")
    c.add_argument("--session", metavar="DEVICE", help="run and trace a device session of benign IoT jobs "
                   "(sensor-hub, dashboard, maintenance) instead of a command")
    c.add_argument("--jobs", type=int, default=40, help="with --session: benign jobs (default: 40)")
    c.add_argument("--attack", action="append", metavar="CLASS=N", help="with --session: attack emulations to mix in "
                   "(fileless, download_exec, reverse_shell, exfiltration, discovery, persistence)")
    c.add_argument("--label", default="benign", help="the label of a command's trace (default: benign)")
    c.add_argument("--alias", action="append", metavar="PREFIX=LABEL",
                   help="label rewriting, e.g. /tmp/run42=$ROOT or 127.0.0.1:5555=127.0.0.1:1883")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    t = sub.add_parser("train", help="learn the frequency database, embedding, autoencoder and thresholds")
    t.add_argument("--trace", action="append", help="benign trace file (repeatable; windows labelled benign)")
    t.add_argument("--paths", help="or: a benign text-path file (one path per line)")
    t.add_argument("--out", required=True, help="the model folder to write")
    _detector_flags(t)
    add_overwrite_flag(t)

    d = sub.add_parser("detect", help="score traces (per window) or a text-path file (per path)")
    d.add_argument("--model", required=True)
    d.add_argument("--trace", action="append", help="trace file (repeatable)")
    d.add_argument("--paths", help="or: a text-path file")
    d.add_argument("--json", metavar="FILE", help="write the results as JSON")

    f = sub.add_parser("federated", help="train the autoencoder across devices on Flower (simulation or app folder)")
    f.add_argument("--fleet", required=True, help="folder with device-K/ sub-folders of benign traces")
    f.add_argument("--clients", type=int, default=3)
    f.add_argument("--rounds", type=int, default=5)
    f.add_argument("--local-epochs", type=int, default=10)
    f.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedprox", "fedadam", "fedyogi"))
    f.add_argument("--out", help="folder for the global autoencoder and federated.json")
    f.add_argument("--flower-app", metavar="DIR", help="write a Flower app folder for `flwr run` instead of simulating")
    _detector_flags(f)


def _pairs(items, what):
    out = []
    for it in items or []:
        if "=" not in it:
            raise RepnetError(f"{what} {it!r}: expected PREFIX=LABEL")
        out.append(tuple(it.split("=", 1)))
    return out


def _settings(args):
    from repnet.proviot.detector import DetectorSettings

    s = DetectorSettings(k=args.k, max_len=args.max_len, embedding=args.embedding, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size,
                         path_quantile=args.path_quantile, window_quantile=args.window_quantile, margin=args.margin,
                         seed=args.seed)
    s.check()
    return s


def run(args: argparse.Namespace) -> int:
    sc = getattr(args, "proviot_command", None)
    if sc is None:
        raise RepnetError("repnet proviot needs a subcommand: collect, train, detect or federated")
    return {"collect": _collect, "train": _train, "detect": _detect, "federated": _federated}[sc](args)


def _collect(args) -> int:
    from repnet.proviot.collect import collector, save_trace

    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    aliases = _pairs(args.alias, "--alias")
    if args.session:
        from repnet.proviot.workloads import plan_session, run_session

        attacks = {}
        for a in args.attack or []:
            name, _, n = a.partition("=")
            try:
                attacks[name] = int(n or 1)
            except ValueError:
                raise RepnetError(f"--attack {a!r}: expected CLASS=N") from None
        trace = run_session(plan_session(args.session, args.jobs, attacks, args.seed), args.session,
                            collector_name=args.collector, seed=args.seed)
    elif args.pid is not None:
        if args.collector != "strace":
            raise RepnetError("--pid works with the strace collector")
        trace = collector("strace").attach(args.pid, args.seconds, aliases=aliases)
    else:
        if not cmd:
            raise RepnetError("collect: give a command after --, a --pid or a --session")
        trace = collector(args.collector).run(cmd, aliases=aliases)
    if not trace.windows:
        trace.meta["label"] = args.label
    save_trace(trace, args.out)
    print(f"wrote {args.out}: {len(trace.events)} events, {len(trace.nodes)} nodes, {len(trace.procs)} processes, "
          f"{len(trace.windows) or 1} window(s) ({trace.collector})")
    return 0


def _train(args) -> int:
    from repnet.proviot.detector import model_kind, save_model
    from repnet.storage import claim_folder, missing_root, release_claim

    s = _settings(args)
    if bool(args.trace) == bool(args.paths):
        raise RepnetError("train: give benign --trace files or one --paths file")
    kind, created = model_kind(), missing_root(args.out)
    folder = claim_folder(args.out, kind=kind, overwrite=args.overwrite)  # refused before the work, not after
    try:
        det, info = _train_detector(args, s)
    except BaseException:
        release_claim(folder, kind, created)
        raise
    save_model(det, folder, info, claimed=True)
    print(f"wrote {args.out}: {info.get('train_paths')} benign paths, path threshold {det.path_threshold:.5f}"
          + (f", window threshold {det.window_threshold:.5f}" if not args.paths else "")
          + f", autoencoder trained in {info['detector_train_time_s']:.2f} s")
    return 0


def _train_detector(args, s):
    from repnet.proviot.detector import train_detector

    if args.paths:
        from repnet.proviot.textpaths import read_paths, train_text_detector

        det, info = train_text_detector(read_paths(args.paths), s)
    else:
        from repnet.proviot.collect import load_trace
        from repnet.proviot.graph import window_graphs

        graphs = [g for f in args.trace for g in window_graphs(load_trace(f)) if g.label == "benign"]
        det, info = train_detector(graphs, s)
    return det, info


def _detect(args) -> int:
    from repnet.proviot.detector import evaluate, load_model
    from repnet.storage import atomic_write_text

    if bool(args.trace) == bool(args.paths):
        raise RepnetError("detect: give --trace files or one --paths file")
    det = load_model(args.model)
    if args.paths:
        from repnet.proviot.textpaths import read_paths, score_text_paths

        rows = score_text_paths(det, read_paths(args.paths))
        for r in rows:
            if r["anomalous"]:
                print(f"ALERT error {r['error']:.5f}: {r['path']}")
        print(f"{sum(r['anomalous'] for r in rows)}/{len(rows)} paths anomalous (threshold {det.path_threshold:.5f})")
        res = {"paths": rows, "path_threshold": det.path_threshold}
    else:
        from repnet.proviot.collect import load_trace
        from repnet.proviot.graph import window_graphs

        graphs, windows = [], []
        for f in args.trace:
            for g in window_graphs(load_trace(f)):
                graphs.append(g)
                r = det.score(g)
                windows.append({"trace": f, "window": g.name, "label": g.label, **r})
                if r["flagged"]:
                    print(f"ALERT {f} [{g.name or 'trace'}] score {r['score']:.5f}: {r['alert']}")
        flagged = sum(w["flagged"] for w in windows)
        print(f"{flagged}/{len(windows)} windows flagged (threshold {det.window_threshold:.5f})")
        res = {"windows": windows, "window_threshold": det.window_threshold}
        if any(g.label != "benign" for g in graphs):
            ev = evaluate(det, graphs)
            o = ev["overall"]
            print(f"precision {o['precision']:.3f} recall {o['recall']:.3f} F1 {o['f1']:.3f}"
                  + (f"; missed: {', '.join(ev['missed_classes'])}" if ev["missed_classes"] else ""))
            res["evaluation"] = {k: v for k, v in ev.items() if k != "alerts"}
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))
    return 0


def _federated(args) -> int:
    from repnet.proviot.federated import FleetSettings, simulate, write_fleet_app, save_fleet_result

    s = _settings(args)
    fs = FleetSettings(fleet=args.fleet, clients=args.clients, rounds=args.rounds, local_epochs=args.local_epochs,
                       strategy=args.strategy, settings=s, out=args.out or "")
    if args.flower_app:
        path = write_fleet_app(args.flower_app, fs)
        print(f"wrote {path}\nstart a SuperLink and {args.clients} SuperNodes (--node-config \"partition-id=K "
              f"num-partitions={args.clients}\"), then: flwr run {args.flower_app} <superlink-connection> --stream")
        return 0
    res = simulate(fs)
    if args.out:
        save_fleet_result(res, args.out)
    b = res["bytes_per_device_per_round"]
    print(f"{res['rounds']} rounds x {res['clients']} devices (Flower {res['strategy']}): each round a device "
          f"receives {b['sent']} B and sends {b['received']} B (autoencoder {res['model_bytes']} B)")
    sys.stdout.flush()
    return 0
