"""``repnet plan``: configurations whose measured training peak fits a memory budget (repnet.training.planner).

The flags name the search space (``--method``, ``--image-sizes``, ``--precisions``, the effective
batch) and the budget (``--budget 40MB``); the table lists each fitting configuration with its
measured peak, its analytic figure, its expected accuracy and the ``repnet train`` command that runs
it (``--json`` writes them all). docs/plan.md is the guide.
"""
from __future__ import annotations

import argparse
import json

from repnet.config.schema import TrainConfig
from repnet.errors import RepnetError

HELP = "fit training into a memory budget: measured configurations, best expected accuracy first"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"json": "file"}


def _names(text: str, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise RepnetError(f"{what} needs at least one name, got '{text}'")
    return names


def _sizes(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text, "--image-sizes")]
    except ValueError:
        raise RepnetError(f"--image-sizes expects whole numbers separated by commas, got '{text}'") from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, help="the memory budget: 40MB, 40 MB, 1.5GB, 512KB, 40 (MB = 1e6 bytes)")
    p.add_argument("--backbone", default=TrainConfig.backbone, help=f"default: {TrainConfig.backbone}")
    p.add_argument("--dataset", default=TrainConfig.dataset, help="its recipe and number of classes (its files need "
                   f"not be here); default: {TrainConfig.dataset}")
    p.add_argument("--method", help="methods to search, comma-separated (default: repnet,tinytl_lb,bias,last)")
    p.add_argument("--image-sizes", help="resolutions to search, comma-separated (default: 224,192,160,128)")
    p.add_argument("--precisions", help="fp32 (float frozen weights), int8-frozen (frozen conv / linear weights in 8 "
                   "bits), int8-side (INT8 training of the side network); comma-separated (default: all three)")
    p.add_argument("--top", type=int, default=5, help="list this many configurations (default: 5)")
    p.add_argument("--effective-batch", type=int, help="images per optimizer step, kept by gradient accumulation "
                   "(default: the dataset recipe's batch size)")
    p.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    p.add_argument("--weights", help="the backbone checkpoint the printed commands pass as --weights (memory does "
                   "not depend on it: nothing is loaded)")
    p.add_argument("--json", metavar="FILE", help="also write the plan (configurations, commands, sources) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from repnet.training.planner import format_plan, parse_budget, plan
    from repnet.storage import atomic_write_text

    budget = parse_budget(args.budget)
    result = plan(budget, args.backbone, args.dataset,
                  methods=_names(args.method, "--method") if args.method else None,
                  image_sizes=_sizes(args.image_sizes) if args.image_sizes else None,
                  precisions=_names(args.precisions, "--precisions") if args.precisions else None,
                  top=args.top, effective_batch=args.effective_batch, num_classes=args.num_classes,
                  weights=args.weights, progress=not args.quiet)
    print(format_plan(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
