"""TinyTL's published memory table, reproduced and explained row by row.

For each TinyTL row (FT-Last, TinyTL-B, TinyTL-L, TinyTL-L+B, FT-Norm+Last, FT-Full) on
ProxylessNAS-Mobile, batch 8, 102 classes, prints and saves:

* ``published``: TinyTL's paper,
* ``ours``: our method on our model (``repnet profile``'s analytic figure),
* ``tinytl config``: the configuration TinyTL's released script actually profiles (lite
  residuals always inserted, its ``requires_grad`` per method, its profiler counting every
  mask once anything trains) - see ``repnet.reproduce.tinytl_memory`` for the explanation.

    python benchmarks/tinytl_table.py --out benchmarks/results/tinytl_table.json

Analytic only (shapes and flags), so it runs in seconds on a CPU; no weights are needed.
"""
from __future__ import annotations

import argparse

from repnet import get_model
from repnet.memory import analyze
from repnet.reproduce.tinytl_memory import reproduce
from common import command_line, write_results

# Rep-Net paper (docs/memory.md, "The Rep-Net paper's figures"), ProxylessNAS-Mobile, batch 8: (label, image size, options, MB)
REPNET_PUBLISHED = [
    ("Rep-Net (dual, stages)", 224, {}, 34.0),
    ("Rep-Net (dual, stages)", 320, {}, 61.0),
    ("Rep-Net (dual, all blocks)", 224, {"placement": "all"}, 37.0),
]


def repnet_rows(batch_size: int, num_classes: int) -> list[dict]:
    rows = []
    for label, size, opts, published in REPNET_PUBLISHED:
        model = get_model("proxylessnas_mobile", "repnet", num_classes=num_classes, image_size=size,
                          pretrained=False, memory="vanilla", **opts)
        rep = analyze(model, size)
        side = sum(p.numel() for m in model.side_modules() for p in m.parameters())
        rows.append({"method": "repnet", "label": label, "options": opts, "image_size": size,
                     "batch_size": batch_size, "published_mb": published,
                     "ours_mb": round(rep.total_mb(batch_size), 3), "side_params": side,
                     "difference_mb": round(rep.total_mb(batch_size) - published, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-sizes", default="224,320", help="comma-separated resolutions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=102)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.image_sizes.split(","))
    rows = reproduce(sizes, args.batch_size, args.num_classes)
    hdr = f"{'method':<10} {'TinyTL name':<26} {'px':>4} {'published':>9} {'ours':>8} {'TinyTL cfg':>10} {'cfg-pub':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        pub = "" if r["published_mb"] is None else f"{r['published_mb']:.1f}"
        diff = "" if r["difference_mb"] is None else f"{r['difference_mb']:+.3f}"
        print(f"{r['method']:<10} {r['tinytl_name']:<26} {r['image_size']:>4} {pub:>9} {r['ours_mb']:>8.2f} "
              f"{r['tinytl_config_mb']:>10.2f} {diff:>8}")
    rp = repnet_rows(args.batch_size, args.num_classes)
    print()
    print(f"{'Rep-Net paper row':<28} {'px':>4} {'published':>9} {'ours':>8} {'ours-pub':>8} {'side params':>11}")
    for r in rp:
        print(f"{r['label']:<28} {r['image_size']:>4} {r['published_mb']:>9.1f} {r['ours_mb']:>8.2f} "
              f"{r['difference_mb']:>+8.2f} {r['side_params']:>11,d}")
    if args.out:
        doc = {
            "benchmark": "TinyTL's published memory table (ProxylessNAS-Mobile), reproduced and explained",
            "command": command_line(argv),
            "units": "MB = 1e6 bytes; analytic (docs/memory.md): peak activation x batch + params",
            "explanation": (
                "TinyTL's script profiles one network for every method: ProxylessNAS-Mobile with the 19 lite "
                "residual modules always inserted (frozen unless the method trains them; their biases train in B, "
                "their norms in Norm+Last, all of them in Full), and its profiler counts every ReLU mask once "
                "anything trains (require_backward), also where no gradient arrives. 'ours' is our method on "
                "our model, without the unused lite residuals and with masks only where a gradient passes."),
            "rows": rows,
            "repnet_rows": rp,
            "repnet_note": (
                "Rep-Net's paper rows are published rounded to 1 MB. Our 320 px figure (60.6) and the dual-all "
                "figure (36.8) round to the published 61 / 37; the 224 px figure (31.5 vs 34) does not. Our side "
                "modules have the released code's shapes (415,464 parameters at 224 px), and every mask is "
                "already counted (backbone biases train). No single configuration difference fits both published "
                "dual figures: a parameter difference P and a peak-activation difference A (which scales with "
                "the image area, x2.04 from 224 to 320 px) would need P + A in [1.97, 2.97] MB at 224 px and "
                "P + 2.04 A in [-0.08, 0.92] MB at 320 px, i.e. A between -2.9 and -1.0 MB and P between 3.0 "
                "and 5.9 MB. The 224 px figure is therefore most likely from another configuration than the 320 px one; it remains unexplained."),
        }
        write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
