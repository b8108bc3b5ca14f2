"""``repnet profile``: training memory of methods on a backbone: analytic, measured kept, peak."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..errors import RepnetError
from ..keyvalue import parse_pairs

HELP = "training-memory profile: analytic, measured kept-for-backward, exact peak of a step"


def configure(pp: argparse.ArgumentParser) -> None:
    pp.add_argument("--backbone", default="proxylessnas_mobile")
    pp.add_argument("--method", default="repnet", help="a method, or several separated by commas")
    pp.add_argument("--image-size", type=int, default=224)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--num-classes", type=int, default=102)
    pp.add_argument("--memory", choices=["engine", "vanilla", "both"], default="engine")
    pp.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    pp.add_argument("--weights", help="backbone checkpoint (memory does not depend on it; default random init)")
    pp.add_argument("--no-measure", action="store_true", help="analytic figures only")
    pp.add_argument("--analytic-order", choices=["run", "paper"], default="run",
                    help="analytic model's execution order: run (this package's forward: Rep-Net's module 1 "
                    "after block 1) or paper (module 1 before the stem, as the released code)")
    pp.add_argument("--frozen-bits", choices=["linear", "kmeans", "fp32"], default="linear",
                    help="how the frozen conv / linear weights are held: 8-bit codes (linear: per-channel int8, "
                    "kmeans: 256-entry codebook), as the papers count them, or fp32 for comparison")
    pp.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="the step's optimizer (its state counts in the peak and in analytic + optimizer)")
    pp.add_argument("--no-peak", action="store_true", help="skip the measured peaks (tensor peak and RSS)")
    pp.add_argument("--no-rss", action="store_true", help="skip the RSS peak (a subprocess per model)")
    pp.add_argument("--runtime", choices=["eager", "executorch"], default="eager",
                    help="executorch: also export each method's ExecuTorch training program (built as `repnet train "
                    "--runtime executorch` builds it) and report its planned arena beside its analytic counterpart")
    pp.add_argument("--json", help="write the record(s) to this JSON file")
    pp.add_argument("--plot", help="write a bar chart PNG across methods")
    pp.add_argument("--tinytl-reference", action="store_true",
                    help="also print TinyTL's published memory table, reproduced row by row (analytic, seconds)")


PROFILE_KEYS = ("backbone", "method", "image_size", "batch_size", "trainable_params", "total_params",
                "analytic_mb", "analytic_with_optimizer_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb",
                "peak_breakdown_mb", "rss_peak_mb")


def profile_one(backbone: str, method: str, image_size: int, batch_size: int, num_classes: int,
                memory: str = "engine", pretrained=False, measure: bool = True, peak: bool = True,
                options: dict | None = None, order: str = "run", runtime: str = "eager",
                frozen_bits: str = "linear", rss: bool = True, optimizer: str = "adam") -> dict:
    """Build a model and return the profile record (the CLI contract's keys, and more).

    ``frozen_bits``: ``linear`` / ``kmeans`` (frozen weights as 8-bit codes, the papers' setting,
    default) or ``fp32``."""
    from ..api import get_model
    from ..memory import profile

    kwargs = {"memory": memory, **(options or {})}
    if frozen_bits != "fp32":
        kwargs["frozen_bits"] = frozen_bits
    if runtime == "executorch":
        from ..executorch_training import program_build

        program_kwargs = program_build(method, options)  # what `repnet train --runtime executorch` builds
        kwargs = {**program_kwargs, "memory": memory}
    model = get_model(backbone, method, num_classes, image_size=image_size, pretrained=pretrained, **kwargs)
    rec = {"backbone": backbone, "method": method, "image_size": image_size, "batch_size": batch_size,
           "num_classes": num_classes, "memory_mode": memory, "options": dataclasses.asdict(model.options)}
    rec.update(profile(model, batch_size=batch_size, image_size=image_size, measure=measure, peak=peak,
                       rss=peak and rss, order=order, optimizer=optimizer))
    if runtime == "executorch":
        from ..executorch_training import analytic_planned_mb, program_memory

        program_model = get_model(backbone, method, num_classes, image_size=image_size, pretrained=pretrained,
                                  **program_kwargs)
        rec.update(program_memory(program_model, batch_size, image_size))
        rec["analytic_planned_mb"] = analytic_planned_mb(rec["analytic_peak_activation_mb"], rec["trainable_params"])
    return rec


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def print_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    data = [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for d in data:
        print("  ".join(v.ljust(w) for v, w in zip(d, widths)))


PROFILE_COLS = [("method", "method"), ("memory_mode", "mode"), ("frozen_bits", "frozen"),
                ("trainable_params", "trainable"), ("analytic_mb", "analytic MB"),
                ("analytic_saved_mb", "analytic kept MB"), ("measured_saved_mb", "measured kept MB"),
                ("analytic_with_optimizer_mb", "analytic + optimizer MB"), ("peak_mb", "peak MB"),
                ("peak_over_analytic", "peak / analytic+opt"), ("rss_peak_mb", "RSS peak MB")]
BREAKDOWN = [("frozen_weights", "frozen weights"), ("trainable_state", "trained weights + grads + optimizer"),
             ("forward_activations", "forward activations"), ("transient", "backward / temporary buffers")]
PROGRAM_COLS = [("analytic_planned_mb", "analytic planned MB"), ("program_planned_mb", "ExecuTorch planned MB")]


def run(args) -> int:
    from ..storage import atomic_write_text

    if args.batch_size < 1:
        raise RepnetError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_classes < 2:
        raise RepnetError(f"--num-classes must be >= 2, got {args.num_classes}")
    methods = args.method.split(",")
    modes = ["engine", "vanilla"] if args.memory == "both" else [args.memory]
    rows = []
    for m in methods:
        for mode in modes:
            rows.append(profile_one(args.backbone, m, args.image_size, args.batch_size, args.num_classes,
                                    memory=mode, pretrained=args.weights or False,
                                    measure=not args.no_measure, peak=not (args.no_peak or args.no_measure),
                                    options=parse_pairs(args.opt, "--opt"), order=args.analytic_order,
                                    runtime=args.runtime, frozen_bits=args.frozen_bits, rss=not args.no_rss,
                                    optimizer=args.optimizer))
    print(f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.num_classes} classes "
          "(MB = 1e6 bytes; analytic = the papers' model, SPEC §7)")
    print_table(rows, PROFILE_COLS + (PROGRAM_COLS if args.runtime == "executorch" else []))
    for r in rows:
        if r.get("peak_breakdown_mb"):
            b, a = r["peak_breakdown_mb"], r["analytic_breakdown_mb"]
            parts = ", ".join(f"{label} {b[k]:.2f}" for k, label in BREAKDOWN)
            print(f"{r['method']} ({r['memory_mode']}): peak {r['peak_mb']:.2f} MB = {parts} (input batch "
                  f"{b['input']:.2f} MB not counted, as in the analytic figure); analytic: frozen weights "
                  f"{a['frozen_weights']:.2f}, trained weights {a['trainable_weights']:.2f}, grads + optimizer "
                  f"{a['gradients_and_optimizer_state']:.2f}, peak activation {a['peak_activation']:.2f}")
    if args.tinytl_reference:
        _print_tinytl_reference(args)
    if args.json:
        out = rows[0] if len(rows) == 1 else rows
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from ..plots import memory_bar_chart

        memory_bar_chart(rows, args.plot, title=f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}")
        print(f"wrote {args.plot}")
    return 0


def _print_tinytl_reference(args) -> None:
    """TinyTL's published rows next to ours and to the configuration TinyTL's script profiled."""
    from ..tinytl_reference import reproduce

    print("\nTinyTL's published table (ProxylessNAS-Mobile, batch 8, 102 classes), MB; 'TinyTL cfg' = its script's "
          "network (lite residuals always inserted, every mask counted): repnet.tinytl_reference")
    rows = [r for r in reproduce((224, 320)) if r["published_mb"] is not None]
    print_table([{"method": r["method"], "px": r["image_size"], "published": r["published_mb"], "ours": r["ours_mb"],
                  "TinyTL cfg": r["tinytl_config_mb"]} for r in rows],
                [("method", "TinyTL row"), ("px", "px"), ("published", "published MB"), ("ours", "our method MB"),
                 ("TinyTL cfg", "TinyTL cfg MB")])
