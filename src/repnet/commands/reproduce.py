"""``repnet reproduce``: run / resume / collect one of the paper's tables (see repnet.reproduce).

``TABLE`` names the table (table1, table2, table3); ``--datasets``, ``--methods``, ``--image-sizes``
and ``--backbones`` select its cells, ``--set`` changes every run, ``--dry-run`` prints the plan as
``repnet train`` commands and ``--collect`` only gathers the finished runs into the summary.
docs/reproduce.md is the guide.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from repnet.errors import RepnetError
from repnet.keyvalue import parse_pairs

HELP = "run / resume / collect a paper table (table1, table2, table3)"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"root": "run"}


def outputs(args: argparse.Namespace) -> dict[str, str]:
    """A dry run writes nothing."""
    return {} if args.dry_run else OUTPUTS
TABLE_NAMES = ("table1", "table2", "table3")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help=f"which paper table: {', '.join(TABLE_NAMES)}")
    p.add_argument("--root", default="runs/reproduce", help="where runs and summaries go (default: runs/reproduce)")
    p.add_argument("--data-dir", help="folder holding one folder per dataset (DIR/flowers102, DIR/cars, ...)")
    p.add_argument("--weights", action="append", metavar="BACKBONE=PATH",
                   help="checkpoint of a backbone (repeatable), e.g. proxylessnas_mobile=proxylessnas_mobile.pth")
    p.add_argument("--datasets", help="only these datasets (comma-separated)")
    p.add_argument("--methods", help="only these methods (comma-separated)")
    p.add_argument("--image-sizes", help="only these resolutions (comma-separated)")
    p.add_argument("--backbones", help="only these backbones (comma-separated)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a training setting of every run (repeatable), e.g. --set epochs=1")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan as repnet train commands; run nothing")
    mode.add_argument("--collect", action="store_true", help="only collect finished runs into the summary")


def run(args: argparse.Namespace) -> int:
    from repnet.config.schema import coerce
    from repnet.reproduce.runner import collect, plan, run_table, train_command

    settings = {k: coerce(k, v) for k, v in parse_pairs(args.set, "--set").items()}
    for k in ("out_dir", "dataset", "backbone", "method"):
        if k in settings:
            raise RepnetError(f"--set {k} would change what the table compares; use the filters instead")
    weights = parse_pairs(args.weights, "--weights")
    filters = {"datasets": args.datasets, "methods": args.methods, "image_sizes": args.image_sizes,
               "backbones": args.backbones}
    if args.dry_run:
        for run in plan(args.table, args.root, args.data_dir, weights, settings, **filters):
            print(train_command(run))
        return 0
    failed = []
    if args.collect:
        summary = collect(args.table, args.root, settings=settings, **filters)
    else:
        statuses = run_table(args.table, args.root, args.data_dir, weights, settings, **filters)
        summary = collect(args.table, args.root, statuses=statuses, settings=settings, write=False, **filters)
        failed = [s for s in statuses if s["status"] == "error"]
        if failed:
            print(f"{len(failed)} run(s) could not start; first: {failed[0]['key']}: {failed[0]['message']}")
    print(summary["markdown"], end="")
    print(f"wrote {Path(args.root) / args.table / 'summary.md'}")
    return 1 if not args.collect and failed else 0
