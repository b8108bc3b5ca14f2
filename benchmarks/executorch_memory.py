"""ExecuTorch training programs: planned memory of the stock export vs repnet's rewritten one.

For each backbone x method (224 px, batch 8, 102 classes, random weights: memory does not depend
on them): the program's planned arena (activations, saved tensors, gradients, outputs; weights
apart) with and without repnet's passes (frozen_conv, activation_mask, avg_pool), against its
analytic counterpart: the papers' peak activation x batch + 4 bytes per trainable parameter (its
gradient), from repnet's analytic model.

    python benchmarks/executorch_memory.py --out benchmarks/results/executorch_memory.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import repnet
from repnet.demo import command_line
from repnet.executorch_training import export_training_program
from repnet.memory import profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="proxylessnas_mobile,mobilenet_v2")
    ap.add_argument("--methods", default="repnet,bias,last")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=102)
    ap.add_argument("--out", default="benchmarks/results/executorch_memory.json")
    args = ap.parse_args(argv)
    rows = []
    for bb in args.backbones.split(","):
        for method in args.methods.split(","):
            torch.manual_seed(0)
            kw = dict(image_size=args.image_size, pretrained=False)
            engine = repnet.get_model(bb, method, args.num_classes, **kw)
            p = profile(engine, batch_size=args.batch_size, image_size=args.image_size, measure=False, peak=False)
            model = repnet.get_model(bb, method, args.num_classes, memory="vanilla", **kw).eval()
            row = {"backbone": bb, "method": method, "image_size": args.image_size, "batch_size": args.batch_size,
                   "trainable_params": p["trainable_params"],
                   "analytic_peak_activation_mb": p["analytic_peak_activation_mb"],
                   "analytic_planned_mb": p["analytic_peak_activation_mb"] + 4 * p["trainable_params"] / 1e6}
            for name, rewrite in (("stock", False), ("rewritten", True)):
                t = time.time()
                try:
                    prog = export_training_program(model, args.batch_size, args.image_size, rewrite=rewrite,
                                                   allow_batch_stats=True)
                except repnet.RepnetError as e:
                    row[f"{name}_error"] = str(e)
                    continue
                row[f"{name}_planned_mb" if name == "stock" else "planned_mb"] = prog.planned_bytes / 1e6
                row["weights_mb"] = prog.weights_bytes / 1e6
                if rewrite:
                    row["rewrites"] = prog.rewrites
                row[f"{name}_export_s"] = time.time() - t
            if "planned_mb" in row:
                row["ratio_to_analytic"] = row["planned_mb"] / row["analytic_planned_mb"]
            if method == "repnet":
                row["note"] = ("Rep-Net's modules use batch norm with batch statistics in eager training; the program "
                               "runs them with fixed statistics (repnet train --runtime executorch refuses it)")
            rows.append(row)
            print(f"{bb:<20} {method:<7} planned {row.get('planned_mb', float('nan')):8.2f} MB (stock "
                  f"{row.get('stock_planned_mb', float('nan')):8.2f}) vs analytic {row['analytic_planned_mb']:7.2f} MB"
                  f" | weights {row.get('weights_mb', float('nan')):.2f} MB", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0], "command": command_line(argv),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "note": "planned = sum of the program's non-constant (arena) buffers from ExecuTorch's memory planning; "
                   "executorch 1.5.1, torch 2.14.1, CPU",
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
