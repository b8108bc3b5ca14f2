"""Training a program on the ExecuTorch runtime from Python: one ``step(x, y)`` is the program's
``forward_backward`` and an SGD step per parameter group (ExecuTorch's SGD), the trained tensors copied
back into the model so evaluation, checkpoints and adapters work on it.

:class:`RuntimeTrainer` is what the runtime hands :func:`repnet.training.loop.fit` (``step=``): one
ExecuTorch SGD optimizer per parameter group (momentum 0.9), the recipe's cosine schedule scaling the
gradients it is handed, and ``results()`` adding the runtime's figures to ``results.json``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
from torch import nn
from repnet.errors import RepnetError
from repnet.runtime.executorch.program import TrainingProgram, require_executorch


#: Lines ExecuTorch's runtime prints on stderr from C++ when its threadpool starts (the first step):
#: ``[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/...`` and the like. They come from ``ET_LOG``
#: calls in the wheel's threadpool library, whose level is fixed when the wheel is built (no environment
#: variable or Python call changes it), so they are filtered out of fd 2 around that first step.
NATIVE_NOISE = ("[cpuinfo_utils.cpp:",)


def without_native_lines(fn, prefixes: tuple[str, ...]):
    """Call ``fn()`` with file descriptor 2 captured; afterwards write back to stderr every captured line
    that does not start with one of ``prefixes`` (a native library's log lines), so nothing else is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            return fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not line.startswith(prefixes)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class RuntimeTrainer:
    """Runs a :class:`TrainingProgram` on the ExecuTorch runtime: one ``step(x, y)`` is its
    ``forward_backward`` and an SGD step per parameter group; the trained tensors are copied back
    into ``model`` after every step, so evaluation, checkpoints and adapters work on ``model``.

    ``schedule(step) -> factor`` (e.g. :class:`repnet.training.loop.CosineSchedule`): the runtime's SGD has a
    fixed learning rate, so the gradients handed to it are scaled by the factor. Without momentum
    that is exactly a scheduled learning rate; with momentum the factor applies to each step's
    gradient as it enters the momentum buffer (torch scales the whole update instead): the same
    decay to zero, not the same trajectory."""

    def __init__(self, model: nn.Module, program: TrainingProgram, lr: float, lr_side: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, schedule=None):
        require_executorch()
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

        self.model, self.program = model, program
        if program.kernels:  # repnet's kernels: their library in this process, on torch's thread count
            from repnet.runtime.executorch.kernels import load_kernels, set_runtime_threads

            load_kernels()
            set_runtime_threads(torch.get_num_threads())
        with warnings.catch_warnings():  # "ExperimentalWarning: This API is experimental ..."
            warnings.simplefilter("ignore")
            self.module = _load_for_executorch_for_training_from_buffer(program.buffer)
        self._make_sgd = lambda params, lr_: get_sgd_optimizer(params, lr_, momentum, 0.0, weight_decay, False)
        groups = model.param_groups(lr, lr_side) if hasattr(model, "param_groups") else \
            [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
        by_lr: dict[float, list[str]] = {}
        for n, p in model.named_parameters():
            if n in program.trainable:
                by_lr.setdefault(lr_of.get(id(p), lr), []).append(n)
        self.groups = by_lr
        self.optimizers = None
        self.params = dict(model.named_parameters())
        self.schedule, self.steps = schedule, 0

    def step(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != self.program.batch_size:
            raise RepnetError(f"the ExecuTorch program trains batches of {self.program.batch_size}, got {x.shape[0]}")
        run = lambda: self.module.forward_backward("forward", (x.contiguous(), y.contiguous()))  # noqa: E731
        loss, logits = run() if self.steps else without_native_lines(run, NATIVE_NOISE)
        grads = self.module.named_gradients()
        if self.optimizers is None:  # the runtime hands out its parameters after the first call
            named = {k.removeprefix("model."): v for k, v in self.module.named_parameters().items()}
            self._named = named
            self.optimizers = [(self._make_sgd({f"model.{n}": named[n] for n in names}, lr), names)
                               for lr, names in self.groups.items() if names]
        factor = self.schedule(self.steps) if self.schedule is not None else 1.0
        self.steps += 1
        for opt, names in self.optimizers:
            step = {f"model.{n}": grads[f"model.{n}"] for n in names}
            if factor != 1.0:
                step = {k: g * factor for k, g in step.items()}
            opt.step(step)
        with torch.no_grad():
            for n, t in self._named.items():
                self.params[n].copy_(t)
        return loss, logits

    def results(self) -> dict:
        p = self.program
        return {"program_planned_mb": p.planned_bytes / 1e6, "program_arena_mb": p.arena_bytes / 1e6,
                "program_weights_mb": p.weights_bytes / 1e6, "program_rewrites": p.rewrites,
                "program_kernels": "repnet" if p.kernels else "portable",
                "optimizer": "executorch sgd (momentum 0.9; gradients scaled by the cosine factor)"}
