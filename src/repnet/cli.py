"""The ``repnet`` command line: list, profile, train, demo.

Every error a user can cause prints one line (``error: ...``) and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import RepnetError


def _parse_opts(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RepnetError(f"--opt expects key=value, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def _weights_arg(args) -> object:
    if getattr(args, "weights", None):
        return args.weights
    return not getattr(args, "random_init", False)


# ----------------------------------------------------------------------------- list
def cmd_list(args) -> int:
    from .backbones import BACKBONES
    from .methods import METHODS

    print("backbones:")
    for n in BACKBONES.names(with_prefixes=True):
        print(f"  {n:<22} {BACKBONES.help(n)}")
    print("methods:")
    for n in METHODS.names():
        cls = METHODS.get(n)
        print(f"  {n:<22} {METHODS.help(n)}")
        if args.verbose:
            for f in dataclasses.fields(cls.Options):
                ch = f.metadata.get("choices")
                extra = f" [{'|'.join(map(str, ch))}]" if ch else ""
                print(f"      --opt {f.name}={f.default}{extra}  {f.metadata.get('help', '')}")
    try:
        from .data import DATASETS
    except ImportError:
        return 0
    print("datasets:")
    for n in DATASETS.names(with_prefixes=True):
        print(f"  {n:<22} {DATASETS.help(n)}")
    return 0


# ----------------------------------------------------------------------------- profile
PROFILE_KEYS = ("backbone", "method", "image_size", "batch_size", "trainable_params", "total_params",
                "analytic_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb")


def profile_one(backbone: str, method: str, image_size: int, batch_size: int, num_classes: int,
                memory: str = "engine", pretrained=False, measure: bool = True, peak: bool = True,
                options: dict | None = None) -> dict:
    """Build a model and return the profile record (the CLI contract's keys, and more)."""
    from .api import get_model
    from .memory import profile

    model = get_model(backbone, method, num_classes, image_size=image_size, pretrained=pretrained,
                      memory=memory, **(options or {}))
    rec = {"backbone": backbone, "method": method, "image_size": image_size, "batch_size": batch_size,
           "num_classes": num_classes, "memory_mode": memory, "options": dataclasses.asdict(model.options)}
    rec.update(profile(model, batch_size=batch_size, image_size=image_size, measure=measure, peak=peak))
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


PROFILE_COLS = [("method", "method"), ("memory_mode", "mode"), ("trainable_params", "trainable"),
                ("analytic_mb", "analytic MB"), ("analytic_saved_mb", "analytic kept MB"),
                ("measured_saved_mb", "measured kept MB"), ("peak_mb", "peak MB")]


def cmd_profile(args) -> int:
    methods = args.method.split(",")
    modes = ["engine", "vanilla"] if args.memory == "both" else [args.memory]
    rows = []
    for m in methods:
        for mode in modes:
            rows.append(profile_one(args.backbone, m, args.image_size, args.batch_size, args.num_classes,
                                    memory=mode, pretrained=_weights_arg(args) if args.weights else False,
                                    measure=not args.no_measure, peak=not (args.no_peak or args.no_measure),
                                    options=_parse_opts(args.opt)))
    print(f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.num_classes} classes "
          "(MB = 1e6 bytes; analytic = the papers' model, SPEC §7)")
    print_table(rows, PROFILE_COLS)
    if args.tinytl_reference:
        _print_tinytl_reference(args)
    if args.json:
        out = rows[0] if len(rows) == 1 else rows
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import memory_bar_chart

        memory_bar_chart(rows, args.plot, title=f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}")
        print(f"wrote {args.plot}")
    return 0


def _print_tinytl_reference(args) -> None:
    """TinyTL's published rows next to ours and to the configuration TinyTL's script profiled."""
    from .tinytl_reference import reproduce

    print("\nTinyTL's published table (ProxylessNAS-Mobile, batch 8, 102 classes), MB; 'TinyTL cfg' = its script's "
          "network (lite residuals always inserted, every mask counted): repnet.tinytl_reference")
    rows = [r for r in reproduce((224, 320)) if r["published_mb"] is not None]
    print_table([{"method": r["method"], "px": r["image_size"], "published": r["published_mb"], "ours": r["ours_mb"],
                  "TinyTL cfg": r["tinytl_config_mb"]} for r in rows],
                [("method", "TinyTL row"), ("px", "px"), ("published", "published MB"), ("ours", "our method MB"),
                 ("TinyTL cfg", "TinyTL cfg MB")])


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repnet", description="Memory-efficient on-device transfer learning (Rep-Net).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pl = sub.add_parser("list", help="backbones, methods (with -v: their options), datasets")
    pl.add_argument("-v", "--verbose", action="store_true")
    pl.set_defaults(func=cmd_list)

    pp = sub.add_parser("profile", help="training-memory profile: analytic, measured kept-for-backward, peak")
    pp.add_argument("--backbone", default="proxylessnas_mobile")
    pp.add_argument("--method", default="repnet", help="a method, or several separated by commas")
    pp.add_argument("--image-size", type=int, default=224)
    pp.add_argument("--batch-size", type=int, default=8)
    pp.add_argument("--num-classes", type=int, default=102)
    pp.add_argument("--memory", choices=["engine", "vanilla", "both"], default="engine")
    pp.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    pp.add_argument("--weights", help="backbone checkpoint (memory does not depend on it; default random init)")
    pp.add_argument("--no-measure", action="store_true", help="analytic figures only")
    pp.add_argument("--no-peak", action="store_true", help="skip the peak measurement")
    pp.add_argument("--json", help="write the record(s) to this JSON file")
    pp.add_argument("--plot", help="write a bar chart PNG across methods")
    pp.add_argument("--tinytl-reference", action="store_true",
                    help="also print TinyTL's published memory table, reproduced row by row (analytic, seconds)")
    pp.set_defaults(func=cmd_profile)

    try:
        from .training import configure_train_parser, run_train

        pt = sub.add_parser("train", help="train a method on a dataset (paper recipe by default)")
        configure_train_parser(pt)
        pt.set_defaults(func=lambda a: _ok(run_train(a)))
    except ImportError:
        pass
    try:
        from .demo import configure_demo_parser, run_demo

        pd = sub.add_parser("demo", help="offline demo: MobileNetV2 -> Fashion-MNIST, repnet vs baselines")
        configure_demo_parser(pd)
        pd.set_defaults(func=lambda a: _ok(run_demo(a)))
    except ImportError:
        pass
    from .reproduce import configure_reproduce_parser, run_reproduce

    pr = sub.add_parser("reproduce", help="run / resume / collect a paper table (table1, table2, table3)")
    configure_reproduce_parser(pr)
    pr.set_defaults(func=run_reproduce)
    from .continual import configure_continual_parser, run_continual

    pc = sub.add_parser("continual", help="tasks in sequence on one frozen backbone, each with its own adapter")
    configure_continual_parser(pc)
    pc.set_defaults(func=lambda a: _ok(run_continual(a)))
    from .export import configure_export_parser, run_export

    pe = sub.add_parser("export", help="export a trained model for inference (.pt2 or ONNX), checked against eager")
    configure_export_parser(pe)
    pe.set_defaults(func=run_export)
    from .federated import cli_federated, configure_federated_parser

    pf = sub.add_parser("federated", help="FedAvg of the method's trainable state over clients (backbone stays home)")
    configure_federated_parser(pf)
    pf.set_defaults(func=cli_federated)
    return p


def _ok(_result) -> int:
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RepnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `repnet list | head`
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
