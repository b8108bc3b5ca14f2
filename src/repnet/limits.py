"""Sane bounds of the sizes and rates a user (or a file) can give: one place, no torch.

A value beyond them is not a bigger experiment but a typo or a crafted file (``num_classes`` 10^12,
``image_size`` 10^9, ``--lr 1e38``): it is refused in one line before anything is built, instead of
an allocation failure, a traceback from the optimizer or a diverged run written as a result.
"""
from __future__ import annotations

import math
import numbers

from repnet.errors import RepnetError

MAX_IMAGE_SIZE = 2048  # px; the papers train at 128..320
MAX_NUM_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_BATCH_SIZE = 65_536
MAX_EPOCHS = 100_000
MAX_STEPS = 10**12
MAX_WORKERS = 1024
MAX_THREADS = 4096
#: The largest learning rate accepted (the recipes use 1e-4 .. 5e-2); above :data:`WARN_LR` a warning.
MAX_LR = 1.0
WARN_LR = 0.1


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (a whole float is accepted, a bool is not); else one line."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral)
                                       or isinstance(value, float) and value.is_integer()):
        raise RepnetError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise RepnetError(f"{name} must be >= {low}, got {value}" if value < low else
                          f"{name} must be <= {high:,d}, got {value:,d}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (``*_open``: the bound itself excluded); else one line."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f"in {lo}, {hi}" if lo and hi else (f"> {low:g}" if low_open else f">= {low:g}") if lo else \
            (f"< {high:g}" if high_open else f"<= {high:g}")
        raise RepnetError(f"{name} must be a finite number {where}, got {value!r}")
    return float(value)
