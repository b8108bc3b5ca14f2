"""Backbone registry: one file per backbone family, each registering its backbones with
``@BACKBONES.register``; no per-backbone forward code.

``create_backbone(name, pretrained=True)`` returns a :class:`Backbone`. ``pretrained``:
``True`` = the offline ImageNet weights where a package ships them (error otherwise),
``False`` = random init, a path or URL = that checkpoint (official formats).
"""
from __future__ import annotations

import importlib
import pkgutil

from repnet.backbones.base import Backbone, BlockInfo, has_shortcut
from repnet.registry import Registry

BACKBONES: Registry = Registry("backbone")

__all__ = ["BACKBONES", "Backbone", "BlockInfo", "create_backbone", "list_backbones", "has_shortcut"]


def create_backbone(name: str, pretrained=True) -> Backbone:
    bb = BACKBONES.get(name)(pretrained)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb


def list_backbones() -> list[str]:
    return BACKBONES.names(with_prefixes=True)


# import every family module so that it registers itself
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m not in ("base", "weights"):
        importlib.import_module(f"{__name__}.{_m}")
