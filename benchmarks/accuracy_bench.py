"""Accuracy benchmark: ImageNet MobileNetV2 -> Fashion-MNIST, every method on the paper's recipe.

The full benchmark (owed on a GPU) is the whole of Fashion-MNIST (54,000 train / 6,000
validation held out of the training set / 10,000 test) at 224 px, batch 8, 50 epochs, the
recipe of ``src/repnet/config/recipes/fashion_mnist.yaml`` (Adam, lr 3e-4 for head + biases, 1e-3
for side modules, cosine per iteration, label smoothing 0.1, crop + flip) for every method:

    python benchmarks/accuracy_bench.py --device cuda --out benchmarks/results/accuracy_gpu

Rows: repnet with frozen backbone BN statistics (memory-free backward; the project default)
and with batch statistics (the released code's behaviour), tinytl_lb, bias, last, full, and a
linear probe (logistic regression on frozen pooled features). Each row's test accuracy is
the final epoch's (the test set is read once per method); its memory figures are analytic /
measured kept-for-backward / measured peak at the benchmark's batch and resolution.

Without a GPU, run it at a reduced scale with the flags (the JSON records the exact command):

    python benchmarks/accuracy_bench.py --image-size 96 --train-subset 3000 --test-subset 2000 \\
        --epochs 6 --out benchmarks/results/accuracy_cpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from repnet.demo.config import DemoConfig, LINEAR_PROBE
from common import command_line, provenance
from repnet.demo.run import compare, format_table, plot, verdict
from repnet.config.recipes import load_recipe
from repnet.training.run import MEMORY_KEYS

METHODS = ("repnet", "repnet@bn=batch", "tinytl_lb", "bias", "last", "full", LINEAR_PROBE)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; name@key=value for options")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--train-subset", type=int, default=None, help="training images (default: all 54,000)")
    p.add_argument("--test-subset", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--memory", choices=["engine", "vanilla"], default="engine")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/accuracy", help="writes OUT.json and OUT.png")
    p.add_argument("--runs-dir", default="runs/accuracy_bench", help="run folders (checkpoints, logs, adapters)")
    args = p.parse_args(argv)

    recipe = load_recipe("fashion_mnist")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = DemoConfig(
        out_dir=args.runs_dir, methods=methods, backbone=args.backbone, image_size=args.image_size,
        train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
        batch_size=args.batch_size, label_smoothing=recipe["label_smoothing"], augment=recipe["augment"],
        memory=args.memory, workers=args.workers, seed=args.seed, device=args.device,
        steps_per_epoch=args.steps_per_epoch,
        lrs={m: (recipe["lr"], recipe["lr_side"]) for m in methods},  # the recipe, for every method
    )
    t0, start = time.time(), provenance()
    rows = compare(cfg)
    full = args.train_subset is None and args.image_size == 224 and args.batch_size == 8 and args.epochs >= 50
    device = rows[0].get("device", args.device)
    title = (f"{args.backbone} -> Fashion-MNIST, {args.image_size}px, batch {args.batch_size}, {args.epochs} epochs, "
             f"{rows[0].get('train_images')} train / {rows[0].get('test_images')} test ({device})")
    table = format_table(rows)
    print(f"\n{title}\n{table}\n" + "\n".join(verdict(rows)))
    keep = ("method", "lr", "lr_side", "l2", "trainable_params", "total_params", *MEMORY_KEYS, "test_accuracy",
            "final_test_accuracy", "best_val_accuracy", "best_val_epoch", "train_images_per_s", "wall_time_s",
            "memory_profile_error")
    result = {
        "benchmark": "accuracy: MobileNetV2 (ImageNet, offline weights) -> Fashion-MNIST",
        "command": command_line(argv),
        "scale": "full" if full else "reduced",
        "note": None if full else ("reduced-scale CPU run; the full benchmark (all of Fashion-MNIST, 224 px, "
                                   "batch 8, 50 epochs, on a GPU) is still owed"),
        "title": title, "recipe": recipe, "device": device, "total_time_s": time.time() - t0,
        "provenance_start": start, "provenance_end": provenance(),
        "rows": [{k: r[k] for k in keep if k in r} for r in rows], "table": table, "verdict": verdict(rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, str(out.with_suffix(".png")), title)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
