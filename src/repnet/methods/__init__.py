"""Method registry: one file per method, each registers itself with ``@METHODS.register``.

Importing the package imports every module of its folder, so a new method is one file
(docs/extending.md). ``base.py`` is what every method shares (:class:`TransferModel`,
:class:`MethodOptions`); ``repnet.py`` is the paper's idea, the other files its baselines
(docs/methods.md).
"""
from __future__ import annotations

import importlib
import pkgutil

from repnet.registry import Registry

METHODS: Registry = Registry("method")

# import every method module so that it registers itself
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m != "base":
        importlib.import_module(f"{__name__}.{_m}")

from repnet.methods.base import MethodOptions, TransferModel, parse_options  # noqa: E402

__all__ = ["METHODS", "MethodOptions", "TransferModel", "parse_options"]
