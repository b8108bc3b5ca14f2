"""Where training steps run: the runtime registry.

A runtime is one registered :class:`Runtime` subclass: how a model is built for it, which settings it
refuses, its trainer (``None``: the eager loop's own PyTorch step), its recipe changes and its figures
in ``repnet profile``. ``eager`` (PyTorch with the memory engine) is the default; ``executorch`` trains
ExecuTorch training programs. A new runtime is one module or package in this folder that registers a
subclass with ``@RUNTIMES.register`` (docs/architecture.md); nothing else changes. Registration
imports nothing heavy: a runtime imports torch or its own library when it is used.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Protocol

from repnet.errors import RepnetError
from repnet.registry import Registry

RUNTIMES: Registry = Registry("runtime")


class Trainer(Protocol):
    """What a runtime's trainer gives :func:`repnet.training.loop.fit`: the whole training step."""

    def step(self, x, y):  # -> (loss, logits)
        ...

    def results(self) -> dict:  # the runtime's own figures for results.json
        ...


@dataclass(frozen=True)
class RunContext:
    """What the training layer hands a runtime that runs a whole training itself (:meth:`Runtime.run`):
    the one way a config builds its data and model, the loop's step plan and evaluation, and the
    messages. (A runtime sits below the training layer, so it is given these rather than importing them.)"""

    build_data: Callable  # (cfg) -> (train, val or None, test, num_classes, class_names)
    build_model: Callable  # (cfg, num_classes, pretrained=None) -> TransferModel
    plan_steps: Callable  # (n_train, cfg) -> (steps per epoch, total steps)
    seed_everything: Callable  # (seed) -> None
    evaluate: Callable  # (model, dataset, cfg) -> {"loss", "accuracy", "images"}
    say: Callable[[str], None]
    on_step: Callable | None = None
    default_dir: str | None = None  # the run folder when cfg.out_dir is unset


class Runtime:
    """The default behaviour (PyTorch); a runtime overrides what differs. ``cfg`` is a
    :class:`~repnet.config.schema.TrainConfig`."""

    name: str = ""
    #: a YAML file of recipe keys training on this runtime changes in every dataset's recipe (or None)
    recipe: str | None = None
    #: columns this runtime adds to ``repnet profile``'s table: (record key, header)
    profile_columns: tuple[tuple[str, str], ...] = ()
    #: whether ``--tune``'s trials (eager PyTorch steps) pick rates this runtime trains with
    tunes: bool = True

    def check(self, cfg, resume: bool = False) -> None:
        """Raise :class:`RepnetError` (one line) for a setting this runtime cannot honour."""

    def model_kwargs(self, cfg) -> dict:
        """The :func:`repnet.get_model` keyword arguments (besides backbone, method, classes, size, weights,
        int8) of the model ``cfg`` trains on this runtime."""
        kwargs = {"memory": cfg.memory, **cfg.options}
        if cfg.frozen_bits != "none":
            kwargs["frozen_bits"] = cfg.frozen_bits
        return kwargs

    def trainer(self, model, cfg, schedule: Callable[[int], float], say: Callable[[str], None]) -> Trainer | None:
        """The object whose ``step`` trains ``model`` (None: the eager loop's PyTorch step and optimizer);
        ``schedule(step)`` is the recipe's learning-rate factor at each step."""
        return None

    def run(self, cfg, ctx: RunContext, resume: str | None = None, overwrite: bool = False) -> dict | None:
        """Run the whole training of ``cfg`` (its own process, folder and checkpoints) and return the
        results; None (the default): the training layer runs it, stepping through :meth:`trainer`."""
        return None

    def profile(self, model, cfg, record: dict) -> dict:
        """This runtime's own memory figures for ``repnet profile`` (keys of ``profile_columns``) of ``model``,
        built for this runtime from ``cfg``; ``record`` holds the eager figures (``repnet.memory.profile``)."""
        return {}


def refuse(runtime: str, what: str, why: str) -> RepnetError:
    """The one-line refusal of a setting a runtime cannot honour."""
    return RepnetError(f"{what} is not supported with --runtime {runtime}: {why}")


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name`` (an unknown name is one line listing the choices)."""
    return RUNTIMES.get(name)()


def runtime_names() -> tuple[str, ...]:
    return tuple(sorted(RUNTIMES.names()))


# import every runtime module / package so that it registers itself
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["RUNTIMES", "Runtime", "RunContext", "Trainer", "get_runtime", "refuse", "runtime_names"]
