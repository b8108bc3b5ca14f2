"""Frozen-scale batch norm keeps nothing with eval statistics (a fixed affine map), and exactly
PyTorch's tensors with batch statistics.

Analytic rule: kept ``4 |x|`` only if the scale trains (per-sample norms - LayerNorm, GroupNorm -
also whenever a gradient passes: their statistics are the sample's own); transient ``4 |x|``;
a frozen batch-statistics norm that a gradient passes keeps ``4 |x|`` that the papers do not
count (reported apart as "frozen BN extra").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from repnet.memory.ops.base import ACT_BYTES, engine_off, owned, wants_grad, weight_trains

class FrozenBatchNormFn(torch.autograd.Function):
    """BatchNorm with a frozen (or absent) scale; the shift may train.

    Eval statistics: a fixed affine map, keeps nothing but its own buffers.
    Batch statistics: keeps the input and per-channel mean / invstd only when the input
    needs a gradient (PyTorch's kernels compute forward, running-stat update and backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        ctx.training, ctx.eps = training, eps
        ctx.dims = [0] + list(range(2, x.dim()))
        need_x = ctx.needs_input_grad[0]
        if training:
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
            if need_x:
                ctx.save_for_backward(x, weight, mean, invstd)
        else:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
            if need_x or ctx.needs_input_grad[2]:
                ctx.save_for_backward(weight, running_mean, running_var)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx = gb = None
        if need_x and ctx.training:
            x, weight, mean, invstd = ctx.saved_tensors
            gx, _, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, ctx.eps, [True, False, need_b])
        elif not ctx.training and need_x and owned(g):
            # eval statistics, and the gradient is ours to overwrite (base.owned): the per-channel
            # scale in place, after the shift's gradient has read it
            weight, running_mean, running_var = ctx.saved_tensors
            gb = g.sum(ctx.dims) if need_b else None
            gx = g.mul_(per_channel(frozen_bn_scale(weight, running_var, ctx.eps), g))
        elif not ctx.training:
            # eval statistics: PyTorch's own kernel (grad_x = g * gamma / sqrt(var + eps), grad_beta =
            # sum g); it reads its "input" argument only for grad_gamma, not requested, so ``g``
            # stands in for the input that was never kept
            weight, running_mean, running_var = ctx.saved_tensors
            gx, _, gb = torch.ops.aten.native_batch_norm_backward(
                g, g, weight, running_mean, running_var, None, None, False, ctx.eps, [need_x, False, need_b])
        if need_b and gb is None:
            gb = g.sum(ctx.dims)
        return gx, None, gb, None, None, None, None, None


def frozen_bn_scale(weight, running_var, eps):
    """The fixed per-channel scale of an eval-statistics norm: ``gamma / sqrt(var + eps)``."""
    s = torch.rsqrt(running_var + eps)
    return s if weight is None else s * weight


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class InplaceFrozenBatchNormFn(torch.autograd.Function):
    """Eval-statistics BatchNorm with a frozen scale, computed in place on its input.

    Only for an input no one else will read: a frozen conv's output handed straight to this
    norm (``CONSUMABLE``, below). ``y = x * s + (beta - mean * s)`` with ``s = gamma /
    sqrt(var + eps)`` - the affine form PyTorch's CPU inference kernel uses - so the conv's
    output and the norm's never exist side by side. Backward: ``g * s`` (in place when the
    gradient is ours), ``sum(g)`` for a trainable shift.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        s = frozen_bn_scale(weight, running_var, eps)
        shift = -running_mean * s if bias is None else bias - running_mean * s
        x.mul_(per_channel(s, x)).add_(per_channel(shift, x))
        ctx.mark_dirty(x)
        ctx.save_for_backward(weight, running_var)  # the norm's own tensors: the scale is recomputed
        ctx.dims, ctx.eps = [0] + list(range(2, x.dim())), eps
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        weight, running_var = ctx.saved_tensors
        s = frozen_bn_scale(weight, running_var, ctx.eps)
        gb = g.sum(ctx.dims) if ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g.mul_(per_channel(s, g)) if owned(g) else g * per_channel(s, g)
        return gx, None, gb, None, None, None


#: The attribute a frozen conv sets on an output whose only reader is the norm right after it
#: in an ``nn.Sequential`` (``repnet.memory.engine`` marks such convs; ops.conv sets it when no
#: hook can see the tensor): that norm may overwrite it.
CONSUMABLE = "_repnet_consumable"


def _engine_batch_norm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` with the frozen-scale Function (same bookkeeping as PyTorch)."""
    m._check_input_dim(x)
    eaf = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        eaf = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    bn_training = m.training or (m.running_mean is None and m.running_var is None)
    track = not m.training or m.track_running_stats
    if bn_training:
        F._verify_batch_size(x.size())
    return FrozenBatchNormFn.apply(
        x, m.weight, m.bias, m.running_mean if track else None, m.running_var if track else None,
        bn_training, eaf, m.eps)


def _consume(m, x) -> bool:
    """Whether ``m`` normalises ``x`` in place: a tagged conv output (``CONSUMABLE``), eval
    statistics, a frozen scale - whether or not anything needs a gradient (the same kernel)."""
    return (x.__dict__.pop(CONSUMABLE, False) and not m.training and m.running_var is not None
            and not wants_grad(m.weight) and not torch.is_autocast_enabled(x.device.type))


def _bn_uses_engine(m, x) -> bool:
    return not (engine_off(x) or wants_grad(m.weight) or not (x.requires_grad or wants_grad(m.bias)))


class MemBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose backward keeps nothing (eval statistics) when its scale is frozen."""

    def forward(self, x):
        if _consume(self, x):
            return InplaceFrozenBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                   self.eps)
        if not _bn_uses_engine(self, x):
            return super().forward(x)
        return _engine_batch_norm(self, x)


SWAP: dict[type, type] = {nn.BatchNorm2d: MemBatchNorm2d}

try:  # timm's fused BN + drop + act
    from timm.layers.norm_act import BatchNormAct2d as _TimmBNAct

    class MemBatchNormAct2d(_TimmBNAct):
        """timm ``BatchNormAct2d``: the engine's batch norm, then its own drop and act modules."""

        def forward(self, x):
            if _consume(self, x):
                x = InplaceFrozenBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                    self.eps)
                return self.act(self.drop(x))
            if not _bn_uses_engine(self, x):
                return super().forward(x)
            return self.act(self.drop(_engine_batch_norm(self, x)))

    SWAP[_TimmBNAct] = MemBatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency
    pass


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
SAMPLE_NORMS = (nn.GroupNorm, nn.LayerNorm)  # statistics of each sample: backward needs the input


def _claims(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES)


def _rule(m, x, out, ctx) -> tuple[float, float, float]:
    nx = x.numel()
    if isinstance(m, SAMPLE_NORMS):
        kept = ACT_BYTES * nx if weight_trains(m) or (ctx.grad_in and ctx.masks == "gradient") else 0.0
        return kept, ACT_BYTES * nx, 0.0
    kept = ACT_BYTES * nx if weight_trains(m) else 0.0
    extra = ACT_BYTES * nx if not kept and m in ctx.batch_stats and ctx.grad_in else 0.0
    return kept, ACT_BYTES * nx, extra


RULE = (_claims, _rule)
