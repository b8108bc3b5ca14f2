"""``repnet profile``: training memory of methods on a backbone: analytic, measured kept, peak (and a
runtime's own figures with ``--runtime``).

One row per method (``--method a,b``) and memory mode (``--memory both``: the engine and plain
PyTorch), each profiled by :func:`repnet.training.profile.profile_one` on the model ``repnet train``
would build; ``--json`` / ``--plot`` write the records and a bar chart, ``--tinytl-reference`` adds
TinyTL's published table rebuilt row by row. docs/memory.md is the guide.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from repnet.errors import RepnetError
from repnet.keyvalue import parse_pairs
from repnet.training.profile import profile_one
from repnet.config.schema import choices_of
from repnet.runtime import get_runtime, runtime_names


#: The --plot file formats (matplotlib's, by suffix).
PLOT_FORMATS = (".png", ".pdf", ".svg")
HELP = "training-memory profile: analytic, measured kept-for-backward, exact peak of a step"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"json": "file", "plot": "file"}


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
    pp.add_argument("--frozen-bits", choices=choices_of("frozen_bits"), default="linear",
                    help="how the frozen conv / linear weights are held: 8-bit codes (linear: per-channel int8, "
                    "kmeans: 256-entry codebook), as the papers count them (default: linear), or none (fp32) for "
                    "comparison")
    pp.add_argument("--optimizer", choices=choices_of("optimizer"),
                    help="the step's optimizer (its state counts in the peak and in analytic + optimizer; default: "
                    "the recipe's, Adam - SGD on the executorch runtime)")
    pp.add_argument("--no-peak", action="store_true", help="skip the measured peaks (tensor peak and RSS)")
    pp.add_argument("--no-rss", action="store_true", help="skip the RSS peak (a subprocess per model)")
    pp.add_argument("--runtime", choices=runtime_names(), default="eager",
                    help="profile the model `repnet train --runtime R` builds, with the runtime's own figures beside "
                    "(executorch: each method's training program's planned arena beside its analytic counterpart)")
    pp.add_argument("--json", help="write the record(s) to this JSON file")
    pp.add_argument("--plot", help="write a bar chart PNG across methods")
    pp.add_argument("--tinytl-reference", action="store_true",
                    help="also print TinyTL's published memory table, reproduced row by row (analytic, seconds)")


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


def run(args) -> int:
    from repnet.storage import atomic_write_text

    from repnet.limits import MAX_BATCH_SIZE, MAX_NUM_CLASSES, check_int

    check_int("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    check_int("--num-classes", args.num_classes, 2, MAX_NUM_CLASSES)
    if args.plot and Path(args.plot).suffix.lower() not in PLOT_FORMATS:
        raise RepnetError(f"--plot {args.plot}: give a {', '.join(PLOT_FORMATS)} file name (the format follows it)")
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
          "(MB = 1e6 bytes; analytic = the papers' model, docs/memory.md)")
    print_table(rows, PROFILE_COLS + list(get_runtime(args.runtime).profile_columns))
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
        atomic_write_text(args.json, json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        from repnet.training.profile import memory_bar_chart

        memory_bar_chart(rows, args.plot, title=f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}")
        print(f"wrote {args.plot}")
    return 0


def _print_tinytl_reference(args) -> None:
    """TinyTL's published rows next to ours and to the configuration TinyTL's script profiled."""
    from repnet.reproduce.tinytl_memory import reproduce

    print("\nTinyTL's published table (ProxylessNAS-Mobile, batch 8, 102 classes), MB; 'TinyTL cfg' = its script's "
          "network (lite residuals always inserted, every mask counted): repnet.reproduce.tinytl_memory")
    rows = [r for r in reproduce((224, 320)) if r["published_mb"] is not None]
    print_table([{"method": r["method"], "px": r["image_size"], "published": r["published_mb"], "ours": r["ours_mb"],
                  "TinyTL cfg": r["tinytl_config_mb"]} for r in rows],
                [("method", "TinyTL row"), ("px", "px"), ("published", "published MB"), ("ours", "our method MB"),
                 ("TinyTL cfg", "TinyTL cfg MB")])
