"""ReLU-like activations keep a bit-packed 1-bit mask; smooth ones (and squeeze-excitation
gates) keep their input, unless MobileTL's step backward is switched on.

Analytic rule: ReLU / ReLU6 / Hardtanh keep ``|x| / 8`` bytes when a gradient passes (transient
``4 |x|``); a smooth activation keeps ``4 |x|`` (``|x| / 8`` with the step backward); a
squeeze-excitation product ``x * gate(x)`` keeps ``x`` and the gate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from repnet.memory.ops.base import ACT_BYTES, engine_off, owned
from repnet.memory.ops.masks import apply_mask, pack_mask

class MaskedActFn(torch.autograd.Function):
    """An activation whose backward is ``g * mask``: keeps the mask bit-packed (numel/8 B), and
    applies it to the incoming gradient in place where no one else holds that gradient.

    ``lo``/``hi`` give the mask ``lo < x < hi`` (ReLU: 0, inf; ReLU6: 0, 6), exactly the
    derivative PyTorch uses; ``step=True`` gives MobileTL's approximation ``x >= 0``.
    ``op(x, inplace)`` computes the forward.
    """

    @staticmethod
    def forward(ctx, x, op, lo, hi, step, inplace):
        packed, ctx.channels_last = pack_mask(x, lo, hi, step)
        ctx.save_for_backward(packed)
        if inplace:
            op(x, True)
            ctx.mark_dirty(x)
            return x
        return op(x, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        # the incoming gradient is overwritten when it is this node's alone (base.owned)
        return apply_mask(g, packed, ctx.channels_last, inplace=owned(g)), None, None, None, None, None


def _clamp_op(lo: float, hi: float):
    def op(x, inplace):
        return x.clamp_(lo, hi) if inplace else x.clamp(lo, hi)
    return op


_RELU_OP = lambda x, inplace: x.clamp_(min=0) if inplace else x.clamp(min=0)  # noqa: E731
_HSWISH_OP = lambda x, inplace: F.hardswish(x, inplace=inplace)  # noqa: E731


def masked_activation(x, kind: str = "relu6", step: bool = False, inplace: bool = False):
    """Functional form: ``kind`` in relu / relu6 / hardswish (hardswish needs ``step=True``)."""
    if kind == "relu":
        return MaskedActFn.apply(x, _RELU_OP, 0.0, float("inf"), step, inplace)
    if kind == "relu6":
        return MaskedActFn.apply(x, _clamp_op(0.0, 6.0), 0.0, 6.0, step, inplace)
    if kind == "hardswish" and step:
        return MaskedActFn.apply(x, _HSWISH_OP, 0.0, 0.0, True, inplace)
    raise ValueError(f"masked_activation: unsupported kind={kind!r} step={step}")


class StepBackwardMixin:
    step_backward: bool = False  # MobileTL's approximate backward, off by default


class MemReLU(StepBackwardMixin, nn.ReLU):
    """``nn.ReLU`` keeping a bit-packed mask for backward."""

    def forward(self, x):
        if engine_off(x) or not x.requires_grad:
            return super().forward(x)
        return MaskedActFn.apply(x, _RELU_OP, 0.0, float("inf"), self.step_backward, self.inplace)


def _hardtanh_forward(self, x):
    if engine_off(x) or not x.requires_grad:
        return nn.Hardtanh.forward(self, x)
    lo, hi = float(self.min_val), float(self.max_val)
    return MaskedActFn.apply(x, _clamp_op(lo, hi), lo, hi, self.step_backward, self.inplace)


class MemHardtanh(StepBackwardMixin, nn.Hardtanh):
    """``nn.Hardtanh`` (e.g. ``Hardtanh(0, 6)``) keeping a bit-packed mask."""

    forward = _hardtanh_forward


class MemReLU6(StepBackwardMixin, nn.ReLU6):
    """``nn.ReLU6`` keeping a bit-packed mask."""

    forward = _hardtanh_forward


class MemHardswish(StepBackwardMixin, nn.Hardswish):
    """``nn.Hardswish``: exact PyTorch backward (keeps its input) unless step backward is on."""

    def forward(self, x):
        if not self.step_backward or engine_off(x) or not x.requires_grad:
            return super().forward(x)
        return MaskedActFn.apply(x, _HSWISH_OP, 0.0, 0.0, True, self.inplace)


SWAP: dict[type, type] = {nn.ReLU: MemReLU, nn.ReLU6: MemReLU6, nn.Hardtanh: MemHardtanh, nn.Hardswish: MemHardswish}

MASK_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
SMOOTH_ACTS = (nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Mish)
SMOOTH_NAMES = ("swish", "sigmoid", "silu", "gelu", "mish", "tanh")
SE_NAMES = ("SqueezeExcitation", "SqueezeExcite", "SEModule", "EffectiveSEModule")


def is_smooth(m: nn.Module) -> bool:
    if isinstance(m, SMOOTH_ACTS):
        return True
    name = type(m).__name__.lower()
    return not list(m.children()) and any(s in name for s in SMOOTH_NAMES)


def is_gate(m: nn.Module) -> bool:
    """A squeeze-excitation block (``out = x * gate(x)``), by its class name."""
    return type(m).__name__ in SE_NAMES


def _claims(m: nn.Module) -> bool:
    return isinstance(m, MASK_ACTS) or is_smooth(m) or is_gate(m)


def _rule(m, x, out, ctx) -> tuple[float, float, float]:
    nx = x.numel()
    if is_gate(m):  # the product keeps x (the gate's gradient) and the gate
        return (ACT_BYTES * (nx + nx // max(1, x.shape[-1] * x.shape[-2])) if ctx.grad_in else 0.0), 0.0, 0.0
    if isinstance(m, MASK_ACTS):
        return (nx / 8 if ctx.act_grad else 0.0), ACT_BYTES * nx, 0.0
    if not ctx.act_grad:
        return 0.0, 0.0, 0.0
    return (nx / 8 if getattr(m, "step_backward", False) else ACT_BYTES * nx), 0.0, 0.0


RULE = (_claims, _rule)
