"""Method registry: one file per method, each registers itself with ``@METHODS.register``."""
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
