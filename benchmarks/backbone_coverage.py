"""Engine and analytic model across backbone families: kept-for-backward, analytic vs measured.

For each backbone (the registered ones and timm families that add other layer types: same-
padding convs, max pooling, squeeze-excitation, LayerNorm) and each method, at 224 px and
batch 8 on CPU: what the rules say is kept (docs/memory.md's rules plus the extensions documented in
``repnet.memory.analytic``), what autograd keeps with the engine, and with plain PyTorch.

    python benchmarks/backbone_coverage.py --out benchmarks/results/backbone_coverage_cpu.json
"""
from __future__ import annotations

import argparse
import time

import torch

import repnet
from repnet.memory import analyze, measure_saved
from common import command_line, write_results

BACKBONES = ("proxylessnas_mobile", "mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_large", "resnet50",
             "timm:tf_efficientnet_lite0", "timm:efficientnet_b0", "timm:resnet18", "timm:convnext_atto",
             "timm:regnetx_002")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--methods", default="bias,repnet")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/backbone_coverage_cpu.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    print(f"{'backbone':28s} {'method':7s} {'analytic':>9s} {'engine':>9s} {'ratio':>6s} {'vanilla':>9s}  (kept MB)")
    for bb in args.backbones.split(","):
        for method in args.methods.split(","):
            t0 = time.time()
            m = repnet.get_model(bb, method, 10, image_size=args.image_size, pretrained=False)
            analytic = analyze(m, args.image_size).saved_mb(args.batch_size)
            engine = measure_saved(m, x).bytes / 1e6
            v = repnet.get_model(bb, method, 10, image_size=args.image_size, pretrained=False, memory="vanilla")
            vanilla = measure_saved(v, x).bytes / 1e6
            row = {"backbone": bb, "method": method, "analytic_saved_mb": round(analytic, 4),
                   "engine_measured_saved_mb": round(engine, 4), "vanilla_measured_saved_mb": round(vanilla, 4),
                   "engine_over_analytic": round(engine / analytic, 4) if analytic else None,
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{bb:28s} {method:7s} {analytic:9.2f} {engine:9.2f} {row['engine_over_analytic'] or 0:6.3f} "
                  f"{vanilla:9.1f}", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0],
           "command": command_line(argv),
           "image_size": args.image_size, "batch_size": args.batch_size, "device": "cpu",
           "note": "random weights (memory does not depend on them); MB = 1e6 bytes", "rows": rows}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
