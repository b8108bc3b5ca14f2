"""repnet: memory-efficient on-device transfer learning (Rep-Net and its baselines).

The public API: ``get_model`` / ``from_pretrained`` (the one build path, :mod:`repnet.api`),
``create_backbone`` / ``BACKBONES``, ``METHODS`` / ``TransferModel``, and ``RepnetError``. The names
are imported on first use (PEP 562), and so are the subpackages (``repnet.memory``, ``repnet.training``,
...), so ``import repnet`` - and the command line's ``--help`` - does not pay for PyTorch until a model
is built. docs/api.md is the reference; docs/architecture.md the map of the package.
"""
from __future__ import annotations

import importlib

from repnet.errors import RepnetError

_EXPORTS = {
    "get_model": "api", "from_pretrained": "api",
    "create_backbone": "backbones", "list_backbones": "backbones", "BACKBONES": "backbones",
    "METHODS": "methods", "TransferModel": "methods",
}
__all__ = [*_EXPORTS, "RepnetError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a subpackage used as an attribute: repnet.memory, repnet.memory.int8, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'repnet' has no attribute '{name}'") from None
