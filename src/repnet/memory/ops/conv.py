"""Frozen convolutions and linear layers keep nothing but their weight; a trainable weight-
standardised conv keeps its raw weight, not a standardised copy.

A frozen weight's layer needs only that weight for the input gradient (a transposed conv /
``g @ W``), so its input is not kept; a trainable bias gets ``sum(g)``. Analytic rule (docs/memory.md):
kept ``|x|`` (x 4 B, or 1 B for int8 codes) only if the weight trains; transient ``4 (|x| + |y| /
groups)`` while it runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from torch.nn.modules.module import _global_forward_hooks

from repnet.memory.ops.base import ACT_BYTES, engine_off, identity, input_bytes, pair, wants_grad, weight_trains
from repnet.memory.ops.norm import CONSUMABLE

class FrozenConv2dFn(torch.autograd.Function):
    """Conv2d with a frozen weight: keeps only the weight tensors (parameters or 8-bit codes)."""

    @staticmethod
    def forward(ctx, x, bias, dequant, stride, padding, dilation, groups, *wparts):
        w = dequant(*wparts)
        y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.in_shape = x.shape
        ctx.dequant = dequant
        ctx.n_wparts = len(wparts)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*wparts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        stride, padding, dilation, groups = ctx.conv
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = conv2d_input_grad(ctx.in_shape, ctx.dequant(*ctx.saved_tensors), g, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gb = g.sum((0, 2, 3))
        return (gx, gb, None, None, None, None, None) + (None,) * ctx.n_wparts


def conv2d_input_grad(in_shape, w, g, stride, padding, dilation, groups):
    """Gradient of ``conv2d`` w.r.t. its input: the transposed convolution of ``g`` with ``w``.

    (``torch.nn.grad.conv2d_input`` would need a materialised input-shaped tensor on CPU.)
    """
    out_pad = [in_shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                  + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in range(2)]
    return F.conv_transpose2d(g, w, None, stride, padding, out_pad, groups, dilation)


def frozen_conv2d(x, bias, wparts, dequant=identity, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` whose weight ``dequant(*wparts)`` is frozen: nothing kept but ``wparts``."""
    return FrozenConv2dFn.apply(x, bias, dequant, pair(stride), pair(padding), pair(dilation), groups, *wparts)


class FrozenLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, dequant, *wparts):
        y = F.linear(x, dequant(*wparts), bias)
        ctx.dequant = dequant
        ctx.n_wparts = len(wparts)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*wparts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(ctx.dequant(*ctx.saved_tensors))
        if ctx.needs_input_grad[1]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return (gx, gb, None) + (None,) * ctx.n_wparts


def frozen_linear(x, bias, wparts, dequant=identity):
    """``F.linear`` with a frozen weight: keeps nothing but the weight tensors."""
    return FrozenLinearFn.apply(x, bias, dequant, *wparts)


def numeric_padding(m: nn.Conv2d):
    """Integer padding of ``m`` or ``None`` where only the plain path can do it."""
    if m.padding_mode != "zeros":
        return None
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            return None  # asymmetric padding: leave it to PyTorch
        return tuple(t // 2 for t in total)
    return tuple(m.padding)


class _WeightMixin:
    """Where an engine conv / linear gets its frozen weight from (overridden by 8-bit storage)."""

    def _frozen_weight(self) -> tuple[tuple[torch.Tensor, ...], Callable]:
        return (self.weight,), identity

    def _weight_trains(self) -> bool:
        return self.weight.requires_grad


#: set by :func:`repnet.memory.engine.apply_engine` on a conv whose output goes straight into the
#: norm after it in an ``nn.Sequential``
FEEDS_NORM = "_feeds_norm"
#: on a fused core's output (ops.fused): the modules, in order, that pass it through as computed
FUSED = "_repnet_fused"


class MemConv2d(_WeightMixin, nn.Conv2d):
    """``nn.Conv2d`` that keeps nothing for backward when its weight is frozen.

    A conv marked ``FEEDS_NORM`` with no forward hook tags its output ``CONSUMABLE``: its only
    reader is the frozen norm that follows, which then normalises it in place (ops.norm).
    """

    def forward(self, x):
        skip = x.__dict__.get(FUSED)
        if skip and skip[0] is self:  # the projection of a fused inverted-residual core (ops.fused)
            skip.pop(0)
            y = x
        else:
            y = self._conv(x)
        if self.__dict__.get(FEEDS_NORM) and not (self._forward_hooks or _global_forward_hooks):
            setattr(y, CONSUMABLE, True)
        return y

    def _conv(self, x):
        if engine_off(x) or self._weight_trains() or not (x.requires_grad or wants_grad(self.bias)):
            return super().forward(x)
        pad = numeric_padding(self)
        if pad is None:
            return super().forward(x)
        wparts, dq = self._frozen_weight()
        return frozen_conv2d(x, self.bias, wparts, dq, self.stride, pad, self.dilation, self.groups)


class MemLinear(_WeightMixin, nn.Linear):
    """``nn.Linear`` that keeps nothing for backward when its weight is frozen."""

    def forward(self, x):
        if engine_off(x) or self._weight_trains() or not (x.requires_grad or wants_grad(self.bias)):
            return super().forward(x)
        wparts, dq = self._frozen_weight()
        return frozen_linear(x, self.bias, wparts, dq)


# ----------------------------------------------------------------------------- weight-standardised conv (trainable)
def standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """timm ``StdConv2d``'s weight standardisation (per output channel), same kernels."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=eps).reshape_as(w)


class StdConv2dFn(torch.autograd.Function):
    """Conv2d with a weight-standardised (WS) weight that keeps the raw weight, not the WS copy.

    Plain PyTorch keeps the standardised weight (a new tensor, as large as the weight) plus the
    input; here the standardisation is recomputed in backward from the parameter. The input is
    kept only when the weight trains.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, stride, padding, dilation, groups):
        y = F.conv2d(x, standardize(weight, eps), bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.eps, ctx.in_shape = eps, x.shape
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_x or need_w:
            ctx.save_for_backward(x if need_w else None, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x or need_w:
            x, weight = ctx.saved_tensors
            with torch.enable_grad():
                w = weight.detach().requires_grad_(need_w)
                ws = standardize(w, ctx.eps)
            if need_x:
                gx = conv2d_input_grad(ctx.in_shape, ws.detach(), g, stride, padding, dilation, groups)
            if need_w:
                gws = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
                (gw,) = torch.autograd.grad(ws, w, gws)
        if need_b:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


SWAP: dict[type, type] = {nn.Conv2d: MemConv2d, nn.Linear: MemLinear}

try:  # timm's weight-standardised conv (Rep-Net / TinyTL side modules)
    from timm.layers import StdConv2d as _TimmStdConv2d

    class MemStdConv2d(_TimmStdConv2d):
        """timm ``StdConv2d`` keeping its raw weight instead of the standardised copy."""

        def forward(self, x):
            if (engine_off(x) or self.padding_mode != "zeros" or isinstance(self.padding, str)
                    or not (x.requires_grad or self.weight.requires_grad or wants_grad(self.bias))):
                return super().forward(x)
            return StdConv2dFn.apply(x, self.weight, self.bias, self.eps, self.stride, self.padding,
                                      self.dilation, self.groups)

    SWAP[_TimmStdConv2d] = MemStdConv2d
except ImportError:  # pragma: no cover
    pass


def _padded_conv_engine(base: type, pre_pad: Callable) -> type:
    """Engine class for a conv subclass whose forward is ``F.conv2d(pre_pad(self, x), ...)`` with
    its numeric ``padding`` (TF-style "same" convs): the padding keeps nothing for backward
    (its gradient is a slice), the frozen conv keeps only its weight."""

    def forward(self, x):
        if engine_off(x) or self._weight_trains() or not (x.requires_grad or wants_grad(self.bias)):
            return base.forward(self, x)
        pad = numeric_padding(self)
        if pad is None:
            return base.forward(self, x)
        wparts, dq = self._frozen_weight()
        return frozen_conv2d(pre_pad(self, x), self.bias, wparts, dq, self.stride, pad, self.dilation, self.groups)

    name = f"Mem{base.__name__}"
    cls = type(name, (_WeightMixin, base),
               {"forward": forward, "__module__": __name__, "__qualname__": name,
                "__doc__": f"``{base.__module__}.{base.__name__}`` that keeps nothing for backward when frozen."})
    globals()[name] = cls  # importable by name: models stay picklable
    return cls


try:  # timm's TF-"same" conv (tf_* models): pads in forward, then a plain conv
    from timm.layers import Conv2dSame as _TimmConv2dSame
    from timm.layers.padding import pad_same as _pad_same

    SWAP[_TimmConv2dSame] = _padded_conv_engine(
        _TimmConv2dSame, lambda m, x: _pad_same(x, m.weight.shape[-2:], m.stride, m.dilation))
except ImportError:  # pragma: no cover
    pass

try:  # EfficientNet-Lite (efficientnet-lite-pytorch): a static ZeroPad2d module, then a plain conv
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding as _StaticSame

    SWAP[_StaticSame] = _padded_conv_engine(_StaticSame, lambda m, x: m.static_padding(x))
except ImportError:  # pragma: no cover - an optional offline package
    pass


_CONV = (nn.modules.conv._ConvNd,)


def _claims(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def _rule(m: nn.Module, x: torch.Tensor, out: torch.Tensor, ctx) -> tuple[float, float, float]:
    kept = input_bytes(m) * x.numel() if weight_trains(m) else 0.0
    groups = m.groups if isinstance(m, _CONV) else 1
    return kept, ACT_BYTES * x.numel() + ACT_BYTES * out.numel() // groups, 0.0


RULE = (_claims, _rule)
