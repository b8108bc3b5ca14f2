"""ExecuTorch training programs: planned memory of the stock export vs repnet's rewritten one.

For each backbone x method (224 px, batch 8, 102 classes, random weights: memory does not depend
on them): the program's planned memory (its arena less the trained weights in it: activations,
saved tensors, gradients, outputs) with repnet's passes (repnet.runtime.executorch.passes.PASSES) and as
ExecuTorch exports it (stock), against its analytic counterpart: the papers' peak activation x
batch + 4 bytes per trainable parameter (its gradient), from repnet's analytic model of the same
model. Methods are built as `repnet train --runtime executorch` builds them
(repnet.runtime.executorch.program.program_build: frozen weights in 8 bits, Rep-Net's modules with GroupNorm).

    python benchmarks/executorch_memory.py --out benchmarks/results/executorch_memory.json
"""
from __future__ import annotations

import argparse
import time

import torch

import repnet
from common import command_line, write_results
from repnet.runtime.executorch.passes import PASSES
from repnet.runtime.executorch.program import analytic_planned_mb, export_training_program, program_build

#: the stock export: ExecuTorch's own, with only the rewrite that lowering needs (avg-pool backward has
#: no runtime kernel; a no-op for models without average pooling)
STOCK = ("avg_pool",)
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
            build = program_build(method)  # as `repnet train --runtime executorch` builds it
            engine = repnet.get_model(bb, method, args.num_classes, image_size=args.image_size, pretrained=False,
                                      **{**build, "memory": "engine"})
            p = profile(engine, batch_size=args.batch_size, image_size=args.image_size, measure=False, peak=False)
            model = repnet.get_model(bb, method, args.num_classes, image_size=args.image_size, pretrained=False,
                                     **build).eval()
            row = {"backbone": bb, "method": method, "norm": getattr(engine.options, "norm", None),
                   "image_size": args.image_size, "batch_size": args.batch_size,
                   "trainable_params": p["trainable_params"],
                   "analytic_peak_activation_mb": p["analytic_peak_activation_mb"],
                   "analytic_planned_mb": analytic_planned_mb(p["analytic_peak_activation_mb"], p["trainable_params"])}
            for name, passes in (("stock", STOCK), ("rewritten", PASSES)):
                t = time.time()
                # stock: ExecuTorch's own kernels too; rewritten: repnet's passes and kernels (the default)
                prog = export_training_program(model, args.batch_size, args.image_size, passes=passes,
                                               kernels=name != "stock")
                if name == "stock":
                    row["stock_planned_mb"] = prog.planned_bytes / 1e6
                else:
                    row.update(planned_mb=prog.planned_bytes / 1e6, arena_mb=prog.arena_bytes / 1e6,
                               weights_mb=prog.weights_bytes / 1e6, rewrites=prog.rewrites)
                row[f"{name}_export_s"] = time.time() - t
            row["ratio_to_analytic"] = row["planned_mb"] / row["analytic_planned_mb"]
            rows.append(row)
            print(f"{bb:<20} {method:<7} planned {row['planned_mb']:8.2f} MB (stock {row['stock_planned_mb']:8.2f}) vs "
                  f"analytic {row['analytic_planned_mb']:7.2f} MB = {row['ratio_to_analytic']:.3f}x | weights "
                  f"{row['weights_mb']:.2f} MB", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0], "command": command_line(argv),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "note": "arena = the program's non-constant buffers from memory planning; planned = arena less the "
                   "trained weights the runtime updates in it (weights_mb counts every weight: frozen ones as int8 "
                   "codes + scales); stock = ExecuTorch's export with only the avg-pool rewrite lowering needs; "
                   "executorch 1.5.1, torch 2.14.1, CPU",
           "rows": rows}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
