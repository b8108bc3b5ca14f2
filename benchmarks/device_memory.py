"""repnet-device's process peak RSS beside the program's arena and weights, and beside the same
training in eager PyTorch (memory engine and plain) and on the Python ExecuTorch runtime.

For each backbone x method (default 224 px, batch 8, 102 classes, random weights: memory does not
depend on them), built as `repnet train --runtime device` builds them (repnet.runtime.executorch.program.program_build):
the training program is exported once (with its metadata, and 16 random images packed), then every
measurement runs in a fresh process of its own:

* ``cpp_peak_rss_mb``: `repnet-device train ... --max-steps 3 --no-checkpoint` - the C++ trainer's own
  figure (/proc/self/status VmHWM before any evaluation), the recipe's Adam;
* ``eager_engine_peak_rss_mb`` / ``eager_plain_peak_rss_mb``: 3 Adam steps of the same model in eager
  PyTorch, with repnet's memory engine / plain PyTorch (``memory="vanilla"``);
* ``python_runtime_peak_rss_mb``: 3 steps of the same .pte on ExecuTorch's Python runtime
  (repnet.runtime.executorch.trainer.RuntimeTrainer: its SGD), the program read from the file (no export in the
  process).

The bar (issue #22): ``cpp_peak_rss_mb <= arena_mb + weights_mb + input_batch_mb + 12`` on every row
(``bar_ok``). The plot: the same columns per row.

    python benchmarks/device_memory.py                                   # the full table (slow: exports at 224 px)
    python benchmarks/device_memory.py --backbones mobilenet_v2 --methods bias --image-size 64 \\
        --out benchmarks/results/device_memory_smoke.json                # one small row
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3
SLACK_MB = 12.0


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# ----------------------------------------------------------------------------- children (fresh processes)
def child(args) -> None:
    import torch

    import repnet
    from repnet.runtime.executorch.program import program_build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    build = program_build(args.method)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    if args.child in ("eager-engine", "eager-plain"):
        memory = "engine" if args.child == "eager-engine" else "vanilla"
        model = repnet.get_model(args.backbone, args.method, args.num_classes, image_size=args.image_size,
                                 pretrained=False, **{**build, "memory": memory})
        model.train()
        opt = torch.optim.Adam(model.param_groups(3e-4, 1e-3))
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    else:  # the Python runtime, on the exported program
        from repnet.runtime.executorch.trainer import RuntimeTrainer
        from repnet.runtime.executorch.program import TrainingProgram

        meta = json.loads(Path(args.meta).read_text())
        model = repnet.get_model(args.backbone, args.method, args.num_classes, image_size=args.image_size,
                                 pretrained=False, **build).eval()
        buffer = Path(args.pte).read_bytes()
        prog = TrainingProgram(buffer, 0, 0, {}, [t["name"] for t in meta["trainable"]], args.batch_size,
                               args.image_size, kernels=b"repnet::" in buffer)  # (its operator names: our kernels)
        trainer = RuntimeTrainer(model, prog, lr=3e-4, lr_side=1e-3)
        for _ in range(STEPS):
            trainer.step(x, y)
    print(json.dumps({"peak_rss_mb": vm_hwm_mb()}))


def run_child(kind: str, args, **extra) -> float:
    cmd = [sys.executable, __file__, "--child", kind, "--backbone", args.backbone_one, "--method", args.method_one,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--num-classes",
           str(args.num_classes)] + [a for k, v in extra.items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_rss_mb"]


# ----------------------------------------------------------------------------- the table
def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("cpp_peak_rss_mb", "repnet-device (C++) peak RSS"), ("budget_mb", "arena + weights + batch + 12 MB"),
            ("python_runtime_peak_rss_mb", "Python runtime peak RSS"),
            ("eager_engine_peak_rss_mb", "eager (engine) peak RSS"), ("eager_plain_peak_rss_mb", "eager (plain) peak RSS")]
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(rows) + 2), 4.8))
    width = 0.8 / len(cols)
    for i, (key, label) in enumerate(cols):
        bars = ax.bar([r + i * width for r in range(len(rows))], [row[key] for row in rows], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(rows))])
    ax.set_xticklabels([f"{row['backbone']}\n{row['method']}" for row in rows], fontsize=8)
    ax.set_ylabel("MB")
    ax.set_yscale("log")
    ax.set_ylim(bottom=5)
    ax.set_title(f"training memory, {rows[0]['image_size']} px, batch {rows[0]['batch_size']} (whole-process peak RSS)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="proxylessnas_mobile,mobilenet_v2")
    ap.add_argument("--methods", default="repnet,bias,last")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=102)
    ap.add_argument("--out", default="benchmarks/results/device_memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--pte", help=argparse.SUPPRESS)
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    import repnet
    from common import command_line, write_results
    from repnet.runtime.executorch.program import export_training_program, program_build
    from repnet.runtime.device import files
    from repnet.runtime.device.runner import find_binary, run_device

    binary = find_binary()
    rows = []
    with tempfile.TemporaryDirectory(prefix="device-memory-") as tmp:
        tmp = Path(tmp)
        for bb in args.backbones.split(","):
            for method in args.methods.split(","):
                torch.manual_seed(0)
                model = repnet.get_model(bb, method, args.num_classes, image_size=args.image_size, pretrained=False,
                                         **program_build(method)).eval()
                prog = export_training_program(model, args.batch_size, args.image_size, 0.1, evaluate=True)
                adam = {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
                meta = files.program_metadata(model, prog, lr=3e-4, lr_side=1e-3, optimizer=adam, total_steps=STEPS,
                                              label_smoothing=0.1)
                pte, meta_path = files.write_program(tmp, prog, meta, name=f"{bb}-{method}")
                data = tmp / f"{bb}-{method}.rpd"
                g = torch.Generator().manual_seed(0)
                files.write_dataset([(torch.randn(3, args.image_size, args.image_size, generator=g), i % args.num_classes)
                                     for i in range(2 * args.batch_size)], data, args.num_classes)
                del model
                events = run_device(["train", "--program", pte, "--train", data, "--out", tmp / f"run-{bb}-{method}",
                                     "--epochs", STEPS, "--max-steps", STEPS, "--no-checkpoint", "--no-adapter",
                                     "--quiet-steps", "--threads", 1], binary=binary)
                end = next(e for e in events if e["event"] == "end")
                args.backbone_one, args.method_one = bb, method
                row = {"backbone": bb, "method": method, "image_size": args.image_size, "batch_size": args.batch_size,
                       "num_classes": args.num_classes, "trainable_tensors": len(prog.trainable),
                       "cpp_peak_rss_mb": end["train_peak_rss_mb"], "arena_mb": prog.arena_bytes / 1e6,
                       "planned_mb": prog.planned_bytes / 1e6, "weights_mb": prog.weights_bytes / 1e6,
                       "eval_arena_mb": prog.eval_arena_bytes / 1e6, "input_batch_mb": end["input_batch_mb"],
                       "program_file_mb": len(prog.buffer) / 1e6, "cpp_step_time_s": end["step_time_s"],
                       "python_runtime_peak_rss_mb": run_child("python-runtime", args, pte=pte, meta=meta_path),
                       "eager_engine_peak_rss_mb": run_child("eager-engine", args),
                       "eager_plain_peak_rss_mb": run_child("eager-plain", args)}
                row["budget_mb"] = row["arena_mb"] + row["weights_mb"] + row["input_batch_mb"] + SLACK_MB
                row["bar_ok"] = row["cpp_peak_rss_mb"] <= row["budget_mb"]
                rows.append(row)
                print(f"{bb:<20} {method:<7} C++ {row['cpp_peak_rss_mb']:7.1f} MB (bar {row['budget_mb']:7.1f}: "
                      f"{'ok' if row['bar_ok'] else 'OVER'}) | arena {row['arena_mb']:.1f} weights {row['weights_mb']:.1f} "
                      f"| Python runtime {row['python_runtime_peak_rss_mb']:.0f} | eager engine "
                      f"{row['eager_engine_peak_rss_mb']:.0f} plain {row['eager_plain_peak_rss_mb']:.0f} MB", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0], "command": command_line(argv),
           "settings": {k: v for k, v in vars(args).items() if k in ("backbones", "methods", "image_size", "batch_size",
                                                                     "num_classes")},
           "note": f"peak RSS = /proc/self/status VmHWM of a fresh process per measurement ({STEPS} training steps; "
                   "the C++ figure before any evaluation); bar: C++ <= arena + weights + input batch + 12 MB; "
                   "threads: 1 (C++: no thread pool; PyTorch: torch.set_num_threads(1)); executorch 1.5.1, "
                   "torch 2.14.1, CPU",
           "all_rows_within_bar": all(r["bar_ok"] for r in rows), "rows": rows}
    write_results(args.out, doc)
    plot(rows, str(Path(args.out).with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
