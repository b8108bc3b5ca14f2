"""ProvIoT benchmark: on-device provenance anomaly detection on real traces made here.

Three "devices" (sensor-hub, dashboard, maintenance: different mixes of benign IoT jobs, real
processes: Mosquitto, sqlite3, curl against a local dashboard, log rotation, backups, python
sensor readers) are traced with strace. Each device gets a benign training session and a test
session with the six harmless attack emulations mixed in (fileless memfd exec, download-and-
execute, reverse shell, credential exfiltration, discovery, persistence; all on 127.0.0.1 and in
temporary folders); labels are the process trees the attacks ran in. Then:

* **central**: one detector trained on the three devices' benign windows (threshold from held-out
  benign windows only), per attack and overall precision / recall / F1 on the held-out test
  windows, for the hash embedding and doc2vec (gensim PV-DM);
* **federated**: the same autoencoder trained by 3 devices on Flower (simulation runtime, FedAvg),
  each device with its own frequency DB and thresholds; the same metrics; bytes per device per round
  counted from the Flower messages;
* **detector training**: time (one thread) and peak memory of a training step (repnet's profiler:
  exact live-tensor peak, and the RSS increase of a step in a fresh process);
* **steady state**: the torch-free monitor (``repnet.proviot.monitor``) following the strace output
  of a benign session as it runs: its CPU % and peak RSS;
* **collector overhead**: the same benign session untraced, under strace and under auditd (where
  this machine lets us audit): wall time and CPU time of the workload.

    python benchmarks/proviot_bench.py --seed 1                 # full run (about 15 min on 2 cores)
    python benchmarks/proviot_bench.py --small --seed 1 --out benchmarks/results/proviot_cpu_small.json

Seed 0 was the development run (the detector's margin was chosen on it); report seed 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import command_line, provenance, write_results
from repnet.proviot import federated as F
from repnet.proviot.collect import AuditdCollector, save_trace
from repnet.proviot.detector import DetectorSettings, autoencoder, evaluate, prepare, save_model, train_detector
from repnet.proviot.graph import window_graphs
from repnet.proviot.workloads import ATTACKS, DEVICES, plan_session, run_session

PUBLISHED = {"f1": 0.97, "training_cpu_overhead_percent": "< 10", "sync_mb": "about 2 (sent + received)",
             "steady_cpu_percent": "< 10", "steady_memory_mb": "< 65",
             "source": "Mukherjee et al., ProvIoT, ACNS 2024"}


def collect_fleet(folder: Path, n_train: int, n_test: int, per_attack: int, seed: int) -> dict:
    out = {}
    for k, dev in enumerate(DEVICES):
        d = folder / f"device-{k}"
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        tr = run_session(plan_session(dev, n_train, seed=seed * 100 + k), dev, seed=seed * 100 + k)
        save_trace(tr, d / "benign-train.json")
        te = run_session(plan_session(dev, n_test, {a: per_attack for a in ATTACKS}, seed=seed * 100 + 50 + k), dev,
                         seed=seed * 100 + 50 + k)
        test_dir = folder / "test"
        test_dir.mkdir(exist_ok=True)
        save_trace(te, test_dir / f"device-{k}.json")
        out[k] = {"device": dev, "train": window_graphs(tr), "test": window_graphs(te),
                  "collect_s": time.time() - t0}
        print(f"device {k} ({dev}): {len(out[k]['train'])} benign training windows, {len(out[k]['test'])} test "
              f"windows ({time.time() - t0:.1f} s)", flush=True)
    return out


def metrics_table(ev: dict) -> dict:
    return {"overall": ev["overall"], "per_attack": ev["per_attack"], "missed_classes": ev["missed_classes"],
            "benign_false_alarms": ev["benign_false_alarms"]}


def detector_memory(x: np.ndarray, batch: int) -> dict:
    from repnet.memory import measure_peak_bytes, measure_tensor_peak

    torch.manual_seed(0)
    ae = autoencoder(x.shape[1])
    xb = torch.as_tensor(x[:batch], dtype=torch.float32)
    t = measure_tensor_peak(ae, xb)
    rss = measure_peak_bytes(ae, xb, threads=1)
    return {"batch": int(len(xb)), "tensor_peak_bytes": t["peak_bytes"], "tensor_peak_breakdown": t["breakdown"],
            "step_rss_increase_bytes": rss, "parameters": int(sum(p.numel() for p in ae.parameters()))}


def steady_state(model_dir: Path, jobs: int, pause: float, interval: float, seed: int) -> dict:
    """The monitor (a separate, torch-free process) follows a benign session's strace output."""
    tmp = Path(tempfile.mkdtemp(prefix="proviot-steady-"))
    raw = tmp / "strace.txt"
    raw.write_text("")
    proc: dict = {}
    est = jobs * (pause + 0.25) + 5

    def start(aliases):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "repnet.proviot.monitor", str(model_dir), str(raw), "--duration", str(est),
                "--interval", str(interval), "--quiet"]
        for a, b in aliases:
            args += ["--alias", f"{a}={b}"]
        proc["p"] = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)

    t0 = time.time()
    tr = run_session(plan_session("sensor-hub", jobs, seed=seed), "sensor-hub", seed=seed, pause=pause,
                     raw_out=str(raw), on_start=start)
    session_s = time.time() - t0
    out, _ = proc["p"].communicate(timeout=est + 120)
    line = next(ln for ln in out.splitlines() if ln.startswith("PROVIOT_MONITOR "))
    res = json.loads(line[len("PROVIOT_MONITOR "):])
    res.update(session_s=session_s, cpu_percent_over_session=100.0 * res["cpu_s"] / session_s,
               session_jobs=jobs, pause_s=pause, interval_s=interval,
               raw_mb=raw.stat().st_size / 1e6, session_events=len(tr.events))
    raw.unlink()
    return res


def collector_overhead(jobs: int, repeats: int, seed: int) -> dict:
    plan = plan_session("sensor-hub", jobs, seed=seed)
    modes = ["none", "strace"]
    why = AuditdCollector().available()
    if why is None:
        modes.append("auditd")
    runs: dict[str, list] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            if m == "none":
                r = run_session(plan, "sensor-hub", seed=seed, traced=False)
                runs[m].append((r["wall_s"], r["cpu_s"]))
            else:
                tr = run_session(plan, "sensor-hub", seed=seed, collector_name=m)
                runs[m].append((tr.meta["wall_s"], tr.meta["cpu_s"]))
    base_w = statistics.median(w for w, _ in runs["none"])
    base_c = statistics.median(c for _, c in runs["none"])
    out = {"jobs": jobs, "repeats": repeats, "auditd": "measured" if why is None else f"not measured: {why}"}
    for m in modes:
        w = statistics.median(x for x, _ in runs[m])
        c = statistics.median(x for _, x in runs[m])
        out[m] = {"wall_s": w, "cpu_s": c, "wall_overhead_percent": 100 * (w / base_w - 1),
                  "cpu_overhead_percent": 100 * (c / base_c - 1)}
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(k, v) for k, v in doc["detection"].items()]
    classes = sorted(ATTACKS)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(runs))
    for i, (name, r) in enumerate(runs):
        vals = [r["per_attack"].get(c, {}).get("f1", 0) for c in classes] + [r["overall"]["f1"]]
        ax.bar(np.arange(len(classes) + 1) + i * width, vals, width, label=name)
    ax.axhline(0.97, color="k", ls="--", lw=1, label="ProvIoT (published avg F1 0.97)")
    ax.set_xticks(np.arange(len(classes) + 1) + width * (len(runs) - 1) / 2)
    ax.set_xticklabels(classes + ["overall"], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (held-out windows)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ProvIoT on real traces (threshold from benign windows only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a smoke-sized run (fewer jobs, rounds, repeats)")
    ap.add_argument("--train-jobs", type=int, default=150, help="benign jobs per device's training session")
    ap.add_argument("--test-jobs", type=int, default=60, help="benign jobs per device's test session")
    ap.add_argument("--per-attack", type=int, default=3, help="runs of each attack per device's test session")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--personal-epochs", type=int, default=10, help="local adaptation after the rounds")
    ap.add_argument("--epochs", type=int, default=60, help="central autoencoder epochs")
    ap.add_argument("--embeddings", default="hash,doc2vec")
    ap.add_argument("--steady-jobs", type=int, default=120)
    ap.add_argument("--steady-pause", type=float, default=0.5, help="seconds between jobs in the steady session")
    ap.add_argument("--overhead-jobs", type=int, default=40)
    ap.add_argument("--overhead-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", help="keep the traces in this folder")
    ap.add_argument("--out", default="benchmarks/results/proviot_cpu.json")
    args = ap.parse_args(argv)
    if args.small:
        args.train_jobs, args.test_jobs, args.per_attack = 60, 20, 1
        args.rounds, args.local_epochs, args.epochs = 12, 10, 40
        args.steady_jobs, args.overhead_jobs, args.overhead_repeats = 20, 12, 1
    torch.set_num_threads(1)
    t_all = time.time()
    folder = Path(args.traces) if args.traces else Path(tempfile.mkdtemp(prefix="proviot-bench-"))
    fleet = collect_fleet(folder, args.train_jobs, args.test_jobs, args.per_attack, args.seed)
    benign = {k: [g for g in v["train"] if g.label == "benign" and g.edges] for k, v in fleet.items()}
    tests = {k: v["test"] for k, v in fleet.items()}
    all_tests = [g for k in sorted(tests) for g in tests[k]]
    doc: dict = {"benchmark": "proviot", "command": command_line(argv), "provenance": provenance(),
                 "machine": "2 shared CPU cores (timings noisy: other work ran beside it)", "published": PUBLISHED,
                 "devices": {str(k): {"device": v["device"], "benign_train_windows": len(benign[k]),
                                      "test_windows": len(tests[k]),
                                      "test_attack_windows": sum(g.label != "benign" for g in tests[k])}
                             for k, v in fleet.items()},
                 "detection": {}}

    # ---- central, per embedding
    all_benign = [g for k in sorted(benign) for g in benign[k]]
    model_dir = None
    for emb in args.embeddings.split(","):
        s = DetectorSettings(embedding=emb, epochs=args.epochs, seed=args.seed)
        t0 = time.process_time()
        det, info = train_detector(all_benign, s)
        cpu = time.process_time() - t0
        ev = evaluate(det, all_tests)
        doc["detection"][f"central-{emb}"] = {**metrics_table(ev), "train": {
            k: info[k] for k in ("train_windows", "train_paths", "summarise_and_embed_s", "detector_train_time_s",
                                 "path_threshold", "window_threshold", "val_windows")},
            "train_cpu_s": cpu, "embedder": info["embedder"], "alerts": ev["alerts"][:12]}
        print(f"central {emb}: F1 {ev['overall']['f1']:.3f} (P {ev['overall']['precision']:.3f} R "
              f"{ev['overall']['recall']:.3f}); missed {ev['missed_classes']}", flush=True)
        if emb == "hash":
            model_dir = folder / "model-hash"
            save_model(det, model_dir, info, overwrite=True)
            _, _, x, _, _ = prepare(all_benign, s)
            doc["detector_training"] = {"paths": int(len(x)), "epochs": s.epochs, "batch_size": s.batch_size,
                                        "train_time_s": info["detector_train_time_s"], "threads": 1,
                                        "memory": detector_memory(x, s.batch_size)}

    # ---- federated (hash embedding: nothing to ship besides the autoencoder)
    s = DetectorSettings(embedding="hash", epochs=args.local_epochs, seed=args.seed)
    fs = F.FleetSettings(fleet=str(folder), clients=len(DEVICES), rounds=args.rounds, local_epochs=args.local_epochs,
                         personal_epochs=args.personal_epochs, settings=s)
    t0 = time.time()
    res = F.simulate(fs, cpus=2)
    ev = F.evaluate_fleet(fs, res["global_state"], tests)
    doc["detection"]["federated-hash"] = {**{k: ev[k] for k in ("overall", "per_attack", "missed_classes",
                                                                "benign_false_alarms")},
                                          "per_device": ev["per_device"]}
    b = res["bytes_per_device_per_round"]
    doc["federated"] = {"framework": "flower", "strategy": res["strategy"], "devices": fs.clients,
                        "rounds": fs.rounds, "local_epochs": fs.local_epochs, "personal_epochs": fs.personal_epochs,
                        "wall_s": time.time() - t0,
                        "model_bytes": res["model_bytes"], "bytes_per_device_per_round": b,
                        "sync_bytes_per_device_per_round": b["sent"] + b["received"],
                        "embedding_bytes": 0, "history": [{k: v for k, v in h.items() if k != "reply_records"}
                                                          for h in res["history"]],
                        "reply_records_last_round": res["history"][-1]["reply_records"]}
    print(f"federated: F1 {ev['overall']['f1']:.3f}; missed {ev['missed_classes']}; a device sends + receives "
          f"{b['sent'] + b['received']} B per round", flush=True)

    # ---- steady state and collector overhead
    doc["steady_state"] = steady_state(model_dir, args.steady_jobs, args.steady_pause, 2.0, args.seed + 7)
    print(f"steady state: monitor CPU {doc['steady_state']['cpu_percent']:.2f} %, peak RSS "
          f"{doc['steady_state']['peak_rss_mb']:.1f} MB", flush=True)
    doc["collector_overhead"] = collector_overhead(args.overhead_jobs, args.overhead_repeats, args.seed + 9)
    print("collector overhead: " + json.dumps({k: v for k, v in doc["collector_overhead"].items()
                                                if isinstance(v, dict)}), flush=True)
    doc["wall_s"] = time.time() - t_all
    write_results(args.out, doc)
    plot(doc, Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
