"""Continual-learning benchmark: tasks in sequence on one ImageNet MobileNetV2, Rep-Net vs naive.

Each run trains the tasks one after another (each dataset's ``repnet train`` recipe: Adam,
cosine, label smoothing, the data layer's augmentations) and after every task evaluates all
tasks seen so far on their test splits:

* ``repnet``: one frozen backbone, a Rep-Net + head per task (``train_bias=false``: the
  backbone never changes, so earlier tasks cannot be forgotten);
* ``naive:bias`` / ``naive:full``: sequential fine-tuning on the same shared backbone, a head
  per task, the backbone's biases / all its weights trained in place task after task (the
  forgetting baseline).
* ``hyblearn@freeze_ratio=0.8``: Hyb-Learn (``repnet.continual.methods.hyblearn``): per task, the backbone tiles most
  correlated with the earlier tasks frozen, the rest retrained in place; weights written per task
  and training memory (what autograd keeps, batch 8) reported per task.
* ``int8:repnet``: as ``repnet``, with the backbone stored in 8 bits and every task's Rep-Net
  and head trained with int8 weights, activations and errors (docs/int8.md, ``repnet.memory.int8``).

CPU run (offline MobileNetV2 weights, 1 thread, the JSON records the exact command):

    python benchmarks/continual_bench.py --image-size 64 --train-subset 1500 --test-subset 1000 --epochs 2 \\
        --out benchmarks/results/continual_cpu.json
    python benchmarks/continual_bench.py --image-size 64 --train-subset 1500 --test-subset 1000 --epochs 2 \\
        --runs hyblearn@freeze_ratio=0.8,hyblearn@freeze_ratio=0.5,repnet,naive:full,naive:bias \\
        --out benchmarks/results/continual_hyblearn_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from repnet.continual.sequence import train_sequence
from common import command_line, provenance
from repnet.demo.config import parse_method
from repnet.storage import atomic_write_text

RUNS = ("repnet", "naive:bias", "naive:full")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,fashion_mnist,mnist5k")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma-separated: a method (name@key=value;... for options), naive:<method>, or "
                        "int8:<method>")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=1500)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/continual_cpu.json")
    p.add_argument("--runs-dir", default="runs/continual_bench", help="run folders (results.json, model/)")
    p.add_argument("--merge", action="store_true", help="add these runs to an existing --out of the same setup")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = {}
    for run in (r.strip() for r in args.runs.split(",") if r.strip()):
        kind, _, spec = run.rpartition(":")
        method, options = parse_method(spec)
        if kind not in ("", "naive", "int8"):
            p.error(f"run '{run}': use a method, naive:<method> or int8:<method>")
        extra = {"int8": True} if kind == "int8" else {}
        tag = run.replace(":", "_").replace("@", "_").replace("=", "-").replace(";", "_")
        r = train_sequence(args.tasks, backbone=args.backbone, method=method, naive=kind == "naive", **extra,
                           options=options, out_dir=Path(args.runs_dir) / f"{tag}-{stamp}",
                           image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                           train_subset=args.train_subset, test_subset=args.test_subset, workers=0,
                           device=args.device, seed=args.seed, progress=sys.stderr.isatty())
        rows[run] = {k: r[k] for k in ("tasks", "acc", "average_accuracy", "backward_transfer", "forgetting",
                                       "average_forgetting", "per_task", "storage", "policy", "hyblearn", "wall_time_s")
                     if k in r}
    out = {
        "command": command_line(argv),
        "setup": {"backbone": args.backbone, "weights": "offline ImageNet (torchvision MobileNetV2)",
                  "tasks": args.tasks.split(","), "image_size": args.image_size, "batch_size": args.batch_size,
                  "epochs": args.epochs, "train_subset": args.train_subset, "test_subset": args.test_subset,
                  "threads": args.threads, "device": args.device, "seed": args.seed,
                  "recipe": "each dataset's repnet train recipe (Adam, cosine per step, label smoothing 0.1); "
                            "no validation split; final epoch of each task; test split evaluated after every task"},
        "runs": rows,
        "provenance": provenance(),
    }
    if args.merge and Path(args.out).is_file():  # more runs into the same file: same setup only
        old = json.loads(Path(args.out).read_text())
        if old.get("setup") != out["setup"]:
            p.error(f"--merge: {args.out} was made with another setup")
        old["runs"].update(rows)
        old.setdefault("more_commands", []).append({"command": out["command"], "runs": list(rows),
                                                    "provenance": out["provenance"]})
        out = old
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
