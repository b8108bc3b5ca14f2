"""The memory-saving ops, one family per module (conv, norm, activations, pooling, fused; ``masks`` and
``base`` are shared helpers). Each op module's ``SWAP`` (plain class -> engine class) and
``RULE`` (its analytic rule) are collected here by discovery: a new op is one new file.

:mod:`repnet.memory.engine` swaps with :data:`SWAP`, :mod:`repnet.memory.analytic` counts with
:data:`RULES`, so the two cannot disagree about an op (docs/memory.md).
"""
from __future__ import annotations

import importlib
import pkgutil

_HELPERS = ("base", "masks")
OP_MODULES = [importlib.import_module(f"{__name__}.{m.name}")
              for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name) if m.name not in _HELPERS]

#: plain class -> engine class, over every op module
SWAP: dict[type, type] = {k: v for mod in OP_MODULES for k, v in getattr(mod, "SWAP", {}).items()}
#: (claims, rule) of every op module (their claims are disjoint)
RULES = [mod.RULE for mod in OP_MODULES if hasattr(mod, "RULE")]
