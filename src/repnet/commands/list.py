"""``repnet list``: backbones, methods (with -v: their options), datasets."""
from __future__ import annotations

import argparse
import dataclasses

HELP = "backbones, methods (with -v: their options), datasets"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true")


def run(args) -> int:
    from ..backbones import BACKBONES
    from ..methods import METHODS

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
    from ..data import DATASETS

    print("datasets:")
    for n in DATASETS.names(with_prefixes=True):
        print(f"  {n:<22} {DATASETS.help(n)}")
    return 0
