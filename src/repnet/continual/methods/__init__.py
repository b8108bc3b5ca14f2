"""Continual methods that are more than one adapter per task: the registry and the driver protocol.

Every transfer method of :data:`repnet.methods.METHODS` is already a continual method (one adapter per
task on the shared frozen backbone). A *driver* decides per task what trains instead: a class in its
own module of this package, registered with ``@CONTINUAL_METHODS.register``, with ``Options`` (a
:class:`~repnet.methods.base.MethodOptions`), ``policy`` (one line), ``task_model(options, cfg, naive)``,
``summary(record)``, ``__init__(options, backbone)``, ``before_task`` / ``after_task``, ``state`` /
``load_state`` (:class:`~repnet.continual.methods.hyblearn.HybLearn` is the example).
"""
from __future__ import annotations

import importlib
import pkgutil

from repnet.registry import Registry

CONTINUAL_METHODS: Registry = Registry("continual method")

# import every driver module so that it registers itself
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["CONTINUAL_METHODS"]
