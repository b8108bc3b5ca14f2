"""INT8 benchmark: Rep-Net trained in fp32 vs in INT8 (repnet.memory.int8, docs/int8.md), same recipe.

Rows: ``fp32`` (the project default: fp32 side network, fp32 frozen backbone), ``int8`` (frozen
backbone in 8 bits, side network + head with int8 weights / activations / errors, errors
stochastically rounded) and ``int8-nearest`` (the same, errors rounded to nearest). Each row is
one ``repnet.training.train`` run of the dataset's recipe (Adam, cosine, label smoothing, ...);
its test accuracy is the final epoch's (the test set is read once). Memory figures are the
analytic model, autograd's measured kept-for-backward and the measured peak of one step, at the
run's batch size and resolution, plus the bytes of the side-network and frozen weights.

Reduced-scale CPU run (the committed ``benchmarks/results/int8_cpu.json``):

    python benchmarks/int8_bench.py --image-size 64 --train-subset 2000 --test-subset 2000 \\
        --epochs 3 --workers 0 --out benchmarks/results/int8_cpu

The full-scale run (all of Fashion-MNIST, 224 px, 50 epochs, on a GPU) is still owed:

    python benchmarks/int8_bench.py --device cuda --out benchmarks/results/int8_gpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from repnet.api import get_model
from common import command_line, provenance
from repnet.memory.int8 import enable_int8_training, int8_layers
from repnet.memory.quant import quantized_weight_numel
from repnet.training.run import MEMORY_KEYS, make_config, train

ROWS = {"fp32": {}, "int8": {"int8": True}, "int8-nearest": {"int8": True, "int8_rounding": "nearest"},
        "int8-master": {"int8": True, "int8_master": "int8"}}


def weight_bytes(backbone: str, image_size: int, num_classes: int, int8: bool, master: str = "fp32") -> dict:
    """Bytes of the side network's conv / linear weights and of the frozen weights."""
    model = get_model(backbone, "repnet", num_classes, image_size=image_size, pretrained=False)
    side = [m for mod in [*model.side_modules(), model.head] for m in mod.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    side_numel = sum(m.weight.numel() for m in side)
    frozen_float = [p for p in model.backbone.parameters() if not p.requires_grad]
    if int8:
        enable_int8_training(model)
        frozen_float = [p for p in model.backbone.parameters() if not p.requires_grad]
    frozen_codes = quantized_weight_numel(model)
    return {
        "int8_layers": len(int8_layers(model)),
        "side_weights": side_numel,
        # the stored trained weights: an fp32 master copy, or (master="int8") the int8 grid values
        "side_weight_bytes_master": (1 if int8 and master == "int8" else 4) * side_numel,
        "side_weight_bytes_mac": (1 if int8 else 4) * side_numel,
        "frozen_weight_bytes": frozen_codes + 4 * sum(p.numel() for p in frozen_float),
        "frozen_8bit_weights": frozen_codes,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/int8", help="writes OUT.json")
    p.add_argument("--runs-dir", default="runs/int8_bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0, start = time.time(), provenance()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        cfg = make_config({
            "dataset": args.dataset, "backbone": args.backbone, "method": "repnet", "image_size": args.image_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "workers": args.workers, "device": args.device, "seed": args.seed,
            "progress": False, "out_dir": f"{args.runs_dir}/{stamp}-{name}", **ROWS[name],
        })
        print(f"--- {name}: {cfg.backbone} -> {cfg.dataset}, {cfg.image_size}px, {cfg.epochs} epochs", flush=True)
        res = train(cfg)
        row = {"row": name, "int8": cfg.int8, "int8_rounding": cfg.int8_rounding if cfg.int8 else None,
               "int8_master": cfg.int8_master if cfg.int8 else None}
        for key in ("test_accuracy", "final_test_accuracy", "best_val_accuracy", "trainable_params", *MEMORY_KEYS,
                    "train_images_per_s", "wall_time_s", "train_images", "test_images", "device",
                    "memory_profile_error"):
            if key in res:
                row[key] = res[key]
        row.update(weight_bytes(cfg.backbone, cfg.image_size, res["num_classes"], cfg.int8, cfg.int8_master))
        rows.append(row)
        print(f"    test accuracy {row['test_accuracy']:.4f}; kept for backward {row['measured_saved_mb']:.2f} MB "
              f"(analytic {row['analytic_saved_mb']:.2f}); {row['train_images_per_s']:.1f} img/s", flush=True)

    print(f"\n{'row':14s} {'test acc':>8s} {'saved MB':>9s} {'peak MB':>8s} {'side B (MAC)':>13s} "
          f"{'frozen B':>10s} {'img/s':>6s}")
    for r in rows:
        print(f"{r['row']:14s} {r['test_accuracy']:8.4f} {r['measured_saved_mb']:9.2f} {r['peak_mb'] or 0:8.2f} "
              f"{r['side_weight_bytes_mac']:13,d} {r['frozen_weight_bytes']:10,d} {r['train_images_per_s']:6.1f}")
    full = args.train_subset is None and args.image_size == 224 and args.epochs >= 50
    result = {
        "benchmark": f"INT8 Rep-Net training: {args.backbone} (ImageNet, offline weights) -> {args.dataset}, fp32 vs int8",
        "command": command_line(argv),
        "scale": "full" if full else "reduced",
        "note": None if full else "reduced-scale CPU run; the full benchmark (224 px, 50 epochs, all data, GPU) is owed",
        "memory_note": "MB = 1e6 bytes at the run's batch size and resolution; measured_saved_mb = autograd's saved "
                       "tensors in one training forward; side_weight_bytes_mac = bytes of the side/head weights the "
                       "MACs read (int8 codes) - training also keeps the fp32 master copy (side_weight_bytes_master)",
        "total_time_s": time.time() - t0,
        "provenance_start": start,
        "provenance_end": provenance(),
        "rows": rows,
    }
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
