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
        print(f"  {n:<22} {METHODS.help(n)}")
        if args.verbose:
            _options(METHODS.get(n).Options)
    from ..continual import CONTINUAL_METHODS

    print("continual methods (repnet continual; every method above is one too: an adapter per task):")
    for n in CONTINUAL_METHODS.names():
        print(f"  {n:<22} {CONTINUAL_METHODS.help(n)}")
        if args.verbose:
            _options(CONTINUAL_METHODS.get(n)[0])
    from ..data import DATASETS

    print("datasets:")
    for n in DATASETS.names(with_prefixes=True):
        print(f"  {n:<22} {DATASETS.help(n)}")
    return 0


def _options(cls) -> None:
    for f in dataclasses.fields(cls):
        ch = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, ch))}]" if ch else ""
        print(f"      --opt {f.name}={f.default}{extra}  {f.metadata.get('help', '')}")
