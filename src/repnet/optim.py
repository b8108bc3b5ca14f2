"""Optimizers and the learning-rate schedule: the one place each is made.

Training (the loop, ``--tune``'s trials), the memory profiler's measured steps and the device
trainer's metadata all take them from here: Adam, AdamW (decoupled weight decay) or SGD with momentum
0.9, and the recipe's schedule - linear warm-up (none in the paper's recipe), then cosine decay to zero,
per optimizer step. The C++ trainer (``device/src/optim.cpp``) implements the same formulas; a test
holds them equal.
"""
from __future__ import annotations

import math

#: Bytes per trainable parameter an optimizer holds beside the weight: its gradient and its state.
OPTIMIZER_STATE_BYTES = {"adam": 12, "adamw": 12, "sgd": 8}
SGD_MOMENTUM = 0.9


def build_optimizer(optimizer: str, params, lr: float, weight_decay: float = 0.0):
    """Adam, AdamW or SGD (momentum :data:`SGD_MOMENTUM`) over ``params`` (tensors or parameter groups;
    a group's own ``weight_decay`` wins over ``weight_decay``)."""
    import torch

    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)


class CosineSchedule:
    """The learning-rate factor at optimizer step ``s`` (0-based): ``(s + 1) / warmup_steps`` during the
    warm-up, then ``0.5 (1 + cos(pi (s - warmup) / (total - warmup)))`` (picklable: a checkpointed
    ``LambdaLR`` holds it)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))

    @classmethod
    def for_run(cls, total_steps: int, warmup_fraction: float = 0.0) -> "CosineSchedule":
        """The schedule of a run of ``total_steps`` whose warm-up is ``warmup_fraction`` of them."""
        return cls(total_steps, round(warmup_fraction * total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, span) / span))
