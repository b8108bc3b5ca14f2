"""``repnet export``: a trained model for inference (.pt2 or ONNX), checked against eager (repnet.export)."""
from __future__ import annotations

import argparse
import os

from ..errors import RepnetError

HELP = "export a trained model for inference (.pt2 or ONNX), checked against eager"


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="a saved adapter folder (save_pretrained; a run's <run>/adapter)")
    src.add_argument("--run", help="a training run folder (uses <run>/adapter)")
    p.add_argument("--weights", help="the backbone checkpoint the adapter was trained on (default: offline weights)")
    p.add_argument("--format", choices=("pt2", "onnx"), help="default: from the --out suffix")
    p.add_argument("--out", required=True, help="output file (.pt2 or .onnx)")
    p.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--no-verify", action="store_true", help="skip the eager-vs-exported check")


def run(args: argparse.Namespace) -> int:
    from ..api import from_pretrained
    from ..export import export_model

    if args.image_size is not None and args.image_size < 32:
        raise RepnetError(f"--image-size must be >= 32, got {args.image_size}")
    adapter = args.adapter or os.path.join(args.run, "adapter")
    model = from_pretrained(adapter, pretrained=args.weights or True)
    rep = export_model(model, args.out, args.format, args.image_size, verify=not args.no_verify)
    check = "" if rep["max_abs_diff"] is None else f"; max |exported - eager| = {rep['max_abs_diff']:.2g}"
    print(f"wrote {rep['path']} ({rep['format']}, {rep['bytes'] / 1e6:.2f} MB, {rep['params']:,d} parameters, "
          f"{rep['image_size']} px, dynamic batch{check})")
    return 0
