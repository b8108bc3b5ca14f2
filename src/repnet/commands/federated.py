"""``repnet federated``: a Flower federation of adapters (repnet.federated / repnet.flower_app).

Without ``--flower-app`` it simulates the federation on this machine
(:func:`repnet.federated.run.run_federated`); with it, it writes the app folder that ``flwr run``
deploys on a SuperLink and SuperNodes (:func:`repnet.federated.run.write_app`). Training keys come as
``--set key=value``, method options as ``--opt``. docs/federated.md is the guide.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from repnet.errors import RepnetError
from repnet.keyvalue import parse_pairs
from repnet.commands.flags import add_overwrite_flag, check_resume_overwrite

HELP = "federated learning of the method's trainable state on Flower (backbone stays home)"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"out": "run", "flower_app": "folder"}


def outputs(args: argparse.Namespace) -> dict[str, str]:
    """With --flower-app, --out is the folder the ServerApp writes on the deployment's machine (not here)."""
    return {"flower_app": "folder"} if args.flower_app else {"out": "run"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--method", default="repnet")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (default: iid)")
    p.add_argument("--strategy", default="fedavg", help="Flower strategy: fedavg (default), fedprox, fedadam, fedyogi")
    p.add_argument("--strategy-opt", action="append", metavar="KEY=VALUE",
                   help="strategy option, e.g. proximal_mu=0.01 (fedprox), eta=0.01 (fedadam / fedyogi)")
    p.add_argument("--min-clients", type=int, default=0,
                   help="usable client replies a round needs (default: all); the others may fail")
    p.add_argument("--round-timeout", type=float, default=3600.0, help="seconds a round waits for replies")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="training config key (repeatable), e.g. --set image_size=96 --set train_subset=2000")
    p.add_argument("--out", help="folder for the per-round checkpoint, results.json and the final adapter")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last round")
    add_overwrite_flag(p)
    p.add_argument("--flower-app", metavar="DIR", help="write a Flower app folder for `flwr run` (deployment on "
                   "a SuperLink and SuperNodes) with these settings instead of simulating")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_resume_overwrite(args)
    from repnet.federated.run import run_federated, write_app

    ov = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method}
    ov.update(parse_pairs(args.set, "--set"))
    if "out_dir" in ov:
        raise RepnetError("--set out_dir: a federated run's folder is --out")
    if args.flower_app and (args.resume or args.overwrite):
        raise RepnetError(f"--{'resume' if args.resume else 'overwrite'} applies to a simulation's --out; "
                          "--flower-app writes a new app (the ServerApp claims --out on the deployment)")
    opts = parse_pairs(args.opt, "--opt")
    if opts:
        ov["options"] = opts
    common = dict(clients=args.clients, rounds=args.rounds, local_epochs=args.local_epochs, scheme=args.partition,
                  out_dir=args.out, strategy=args.strategy, strategy_options=parse_pairs(args.strategy_opt,
                                                                                         "--strategy-opt"),
                  min_clients=args.min_clients, timeout=args.round_timeout)
    if args.flower_app:
        path = write_app(args.flower_app, ov, **common)
        print(f"wrote {path}\nstart a SuperLink and {args.clients} SuperNodes (--node-config \"partition-id=K "
              f"num-partitions={args.clients}\"), then: flwr run {args.flower_app} <superlink-connection> --stream")
        return 0
    if args.resume and not args.out:
        raise RepnetError("--resume needs --out (the run folder)")
    res = run_federated({**ov, "progress": False}, progress=not args.quiet, resume=args.resume,
                        overwrite=args.overwrite, **common)
    accs = " -> ".join(f"{h['test_accuracy']:.3f}" for h in res["history"])
    print(f"test accuracy by round: {accs}")
    print(f"each message {res['message_bytes'] / 1e6:.2f} MB (adapter {res['adapter_bytes'] / 1e6:.2f} MB; the whole "
          f"model: {res['full_model_bytes'] / 1e6:.2f} MB); {res['total_bytes'] / 1e6:.1f} MB exchanged in "
          f"{res['rounds']} rounds x {res['clients']} clients (Flower {res['strategy']})")
    if args.out:
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'adapter'}")
    return 0
