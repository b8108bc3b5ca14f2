"""The training-memory engine: frozen layers that keep (almost) nothing for backward.

Why this file exists
--------------------
Training memory on an edge device is dominated by the activations autograd keeps for the
backward pass. Training few parameters (biases, a side network, the classifier) does not by
itself shrink them, because in plain PyTorch

* a convolution with a *frozen* weight still saves its input (it only needs its weight to
  compute the input gradient),
* a BatchNorm with frozen statistics and a frozen scale still saves its input (it is just a
  fixed per-channel affine map ``y = x * scale + shift``, whose input gradient is
  ``g * scale``),
* ReLU / ReLU6 save a float tensor where one bit per element (``x`` inside the linear
  range or not) is all the backward needs.

The papers' analytic memory figures (SPEC §7) assume those savings; this engine makes them
real. Each rule is a small :class:`torch.autograd.Function`:

==========================  =========================================================
layer (frozen weight)       kept for backward
==========================  =========================================================
Conv2d / Linear             nothing but the weight (a parameter, resident anyway);
                            grad_input = transposed conv / ``g @ W``; a trainable bias
                            gets ``sum(g)``
BatchNorm2d, eval stats     nothing but its buffers: ``grad = g * gamma / sqrt(var+eps)``;
                            a trainable shift gets ``sum(g)`` per channel
BatchNorm2d, batch stats    its input + per-channel mean / invstd, and only when a
                            gradient must reach the input (exactly PyTorch's gradient
                            and running-statistics update)
ReLU / ReLU6 / Hardtanh     a 1-bit mask, bit-packed into ``uint8`` (numel / 8 bytes)
AvgPool2d (no weight)       nothing (PyTorch keeps the input, of which it reads the shape)
==========================  =========================================================

Hardswish / SiLU / Sigmoid keep their input exactly as PyTorch does, unless a module opts
into MobileTL's step approximation (:func:`set_step_backward`: backward ``g * 1[x >= 0]``,
so a 1-bit mask is kept instead). A *trainable* weight-standardised conv (timm
``StdConv2d``, used by the Rep-Net / TinyTL side modules) keeps its input, as it must, but
recomputes the standardised weight in backward instead of keeping a copy of it.

Where a layer needs a statistic of its input to compute the input gradient (BatchNorm with
batch statistics, a conv whose weight trains) the engine keeps exactly what PyTorch keeps.

How it is applied
-----------------
:func:`apply_engine` swaps the *class* of every exact-type leaf module it knows
(``m.__class__ = MemConv2d`` where ``MemConv2d`` subclasses ``nn.Conv2d``). Parameters,
buffers, ``state_dict`` keys and ``isinstance`` checks are unchanged; only ``forward``
differs. Each engine module decides per call: if its own weight trains (or autograd is off,
or autocast is on, or nothing upstream or in the layer needs a gradient) it runs the
ordinary PyTorch path; otherwise the memory-saving Function. :func:`remove_engine` restores
the original classes. The backward kernels are PyTorch's own (transposed convolution,
``native_batch_norm_backward``), so gradients equal plain PyTorch's (tested in float64 to
1e-9 relative on every method x backbone, typically bit-identical).

Functional calls (``F.relu``, ``F.avg_pool2d``, ...) inside ``forward`` methods are not seen
by the class swap: use modules, or this file's functional forms (:func:`avg_pool2d`,
:func:`masked_activation`, :func:`frozen_conv2d`, :func:`frozen_linear`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "apply_engine", "remove_engine", "engine_applied", "set_step_backward",
    "pack_bits", "unpack_bits", "apply_mask", "frozen_conv2d", "frozen_linear", "masked_activation", "avg_pool2d",
    "MemConv2d", "MemLinear", "MemBatchNorm2d", "MemReLU", "MemReLU6", "MemHardtanh", "MemHardswish",
    "MemAvgPool2d", "MemMaxPool2d",
]


# ----------------------------------------------------------------------------- 1-bit masks
# Packing multiplies each group of 8 mask bytes (read as one int64 whose bytes are 0 / 1)
# by a magic constant that gathers the 8 low bits into the top byte: no carries can occur,
# so it is exact. Unpacking looks each byte up in a 256-row table. The backward applies the
# mask by a bitwise AND of the gradient's bits with a looked-up all-ones / all-zeros word,
# which gives exactly ``where(mask, g, 0)`` at the cost of one table lookup.
_PACK_MAGIC = 0x0102040810204080
_TABLES: dict[tuple, torch.Tensor] = {}
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _table(kind: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8) table: bit i of each byte, as ``bool`` or as an all-ones (-1) / zero integer word."""
    key = (kind, device)
    t = _TABLES.get(key)
    if t is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        t = bits.bool() if kind == torch.bool else (-bits).to(kind)
        t = _TABLES[key] = t.to(device)
    return t


def _words(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(torch.uint8).view(torch.int64)  # 8 mask bytes per word


def pack_bits(mask: torch.Tensor, and_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a bool tensor (AND ``and_mask``) into ``ceil(numel / 8)`` bytes (bit i of byte j = element 8j+i)."""
    words = _words(mask)
    words = words.bitwise_and(_words(and_mask)) if and_mask is not None else words.clone()
    # the int64 product wraps; its top byte is exact
    return words.mul_(_PACK_MAGIC).bitwise_right_shift_(56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    n = math.prod(shape)
    return _table(torch.bool, packed.device).index_select(0, packed.int()).view(-1)[:n].view(shape)


def apply_mask(g: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``where(mask, g, 0)`` for a mask packed by :func:`pack_bits` (same shape as ``g``)."""
    it = _INT_OF.get(g.dtype)
    if it is None:
        return g.where(unpack_bits(packed, g.shape), 0)
    words = _table(it, packed.device).index_select(0, packed.int()).view(-1)[: g.numel()].view(g.shape)
    return words.bitwise_and_(g.view(it)).view(g.dtype)


# ----------------------------------------------------------------------------- helpers
def _identity(w: torch.Tensor) -> torch.Tensor:
    return w


def _wants_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


def _engine_off(x: torch.Tensor) -> bool:
    """Cases where the engine steps aside: autograd off, or autocast (dtype policy is PyTorch's)."""
    return not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)


# ----------------------------------------------------------------------------- conv / linear
class _FrozenConv2dFn(torch.autograd.Function):
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


def frozen_conv2d(x, bias, wparts, dequant=_identity, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` whose weight ``dequant(*wparts)`` is frozen: nothing kept but ``wparts``."""
    return _FrozenConv2dFn.apply(x, bias, dequant, _pair(stride), _pair(padding), _pair(dilation), groups, *wparts)


class _FrozenLinearFn(torch.autograd.Function):
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


def frozen_linear(x, bias, wparts, dequant=_identity):
    """``F.linear`` with a frozen weight: keeps nothing but the weight tensors."""
    return _FrozenLinearFn.apply(x, bias, dequant, *wparts)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _numeric_padding(m: nn.Conv2d):
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
        return (self.weight,), _identity

    def _weight_trains(self) -> bool:
        return self.weight.requires_grad


class MemConv2d(_WeightMixin, nn.Conv2d):
    """``nn.Conv2d`` that keeps nothing for backward when its weight is frozen."""

    def forward(self, x):
        if _engine_off(x) or self._weight_trains() or not (x.requires_grad or _wants_grad(self.bias)):
            return super().forward(x)
        pad = _numeric_padding(self)
        if pad is None:
            return super().forward(x)
        wparts, dq = self._frozen_weight()
        return frozen_conv2d(x, self.bias, wparts, dq, self.stride, pad, self.dilation, self.groups)


class MemLinear(_WeightMixin, nn.Linear):
    """``nn.Linear`` that keeps nothing for backward when its weight is frozen."""

    def forward(self, x):
        if _engine_off(x) or self._weight_trains() or not (x.requires_grad or _wants_grad(self.bias)):
            return super().forward(x)
        wparts, dq = self._frozen_weight()
        return frozen_linear(x, self.bias, wparts, dq)


# ----------------------------------------------------------------------------- weight-standardised conv
def _standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """timm ``StdConv2d``'s weight standardisation (per output channel), same kernels."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=eps).reshape_as(w)


class _StdConv2dFn(torch.autograd.Function):
    """Conv2d with a weight-standardised (WS) weight that keeps the raw weight, not the WS copy.

    Plain PyTorch keeps the standardised weight (a new tensor, as large as the weight) plus the
    input; here the standardisation is recomputed in backward from the parameter. The input is
    kept only when the weight trains.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, stride, padding, dilation, groups):
        y = F.conv2d(x, _standardize(weight, eps), bias, stride, padding, dilation, groups)
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
                ws = _standardize(w, ctx.eps)
            if need_x:
                gx = conv2d_input_grad(ctx.in_shape, ws.detach(), g, stride, padding, dilation, groups)
            if need_w:
                gws = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
                (gw,) = torch.autograd.grad(ws, w, gws)
        if need_b:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


# ----------------------------------------------------------------------------- pooling
class _AvgPool2dFn(torch.autograd.Function):
    """``F.avg_pool2d`` keeping nothing (PyTorch keeps the input, though only its shape is used)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.in_shape = x.shape
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        shape_only = g.new_empty(1).expand(ctx.in_shape)  # no memory: avg-pool backward reads the shape
        gx = torch.ops.aten.avg_pool2d_backward(g, shape_only, *ctx.args)
        return gx, None, None, None, None, None, None


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Drop-in ``F.avg_pool2d`` for 4-D input whose backward keeps nothing."""
    if _engine_off(x) or not x.requires_grad or x.dim() != 4:
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride)
    return _AvgPool2dFn.apply(x, list(k), list(s), list(_pair(padding)), ceil_mode, count_include_pad,
                              divisor_override)


class MemAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose backward keeps nothing."""

    def forward(self, x):
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)


class _MaxPool2dFn(torch.autograd.Function):
    """Max pooling that keeps, per output element, the arg-max's position inside its window
    (1 byte) instead of the input and int64 indices (PyTorch: 4 B per input + 8 B per output)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        w_in = x.shape[-1]
        top, left = _window_origins(y.shape, stride, padding, x.device)
        row, col = idx.div(w_in, rounding_mode="floor") - top, idx.remainder(w_in) - left
        offset = (row // dilation[0]) * kernel[1] + (col // dilation[1])
        ctx.save_for_backward(offset.to(torch.uint8))
        ctx.meta = (x.shape, kernel, stride, padding, dilation)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (offset,) = ctx.saved_tensors
        in_shape, kernel, stride, padding, dilation = ctx.meta
        top, left = _window_origins(g.shape, stride, padding, g.device)
        off = offset.long()
        idx = (top + (off // kernel[1]) * dilation[0]) * in_shape[-1] + left + (off % kernel[1]) * dilation[1]
        n = g.shape[0] * g.shape[1]
        gx = g.new_zeros(n, in_shape[-2] * in_shape[-1])
        gx.scatter_add_(1, idx.reshape(n, -1), g.reshape(n, -1))
        return gx.view(in_shape), None, None, None, None, None


def _window_origins(out_shape, stride, padding, device):
    """Top row / left column (in input coordinates) of every output element's window."""
    top = torch.arange(out_shape[-2], device=device).view(-1, 1) * stride[0] - padding[0]
    left = torch.arange(out_shape[-1], device=device).view(1, -1) * stride[1] - padding[1]
    return top, left


class MemMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` keeping 1 byte per output element for backward (the window arg-max)."""

    def forward(self, x):
        kernel = _pair(self.kernel_size)
        if (_engine_off(x) or not x.requires_grad or self.return_indices or x.dim() != 4
                or kernel[0] * kernel[1] > 256):
            return super().forward(x)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        return _MaxPool2dFn.apply(x, kernel, stride, _pair(self.padding), _pair(self.dilation), self.ceil_mode)


# ----------------------------------------------------------------------------- batch norm
class _FrozenBatchNormFn(torch.autograd.Function):
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
    return _FrozenBatchNormFn.apply(
        x, m.weight, m.bias, m.running_mean if track else None, m.running_var if track else None,
        bn_training, eaf, m.eps)


def _bn_uses_engine(m, x) -> bool:
    return not (_engine_off(x) or _wants_grad(m.weight) or not (x.requires_grad or _wants_grad(m.bias)))


class MemBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose backward keeps nothing (eval statistics) when its scale is frozen."""

    def forward(self, x):
        if not _bn_uses_engine(self, x):
            return super().forward(x)
        return _engine_batch_norm(self, x)


# ----------------------------------------------------------------------------- activations
class _MaskedActFn(torch.autograd.Function):
    """An activation whose backward is ``g * mask``: keeps the mask bit-packed (numel/8 B).

    ``lo``/``hi`` give the mask ``lo < x < hi`` (ReLU: 0, inf; ReLU6: 0, 6), exactly the
    derivative PyTorch uses; ``step=True`` gives MobileTL's approximation ``x >= 0``.
    ``op(x, inplace)`` computes the forward.
    """

    @staticmethod
    def forward(ctx, x, op, lo, hi, step, inplace):
        if step:
            packed = pack_bits(x >= 0)
        elif hi == float("inf"):
            packed = pack_bits(x > lo)
        else:
            packed = pack_bits(x > lo, x < hi)
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
        return apply_mask(g, packed), None, None, None, None, None


def _clamp_op(lo: float, hi: float):
    def op(x, inplace):
        return x.clamp_(lo, hi) if inplace else x.clamp(lo, hi)
    return op


_RELU_OP = lambda x, inplace: x.clamp_(min=0) if inplace else x.clamp(min=0)  # noqa: E731
_HSWISH_OP = lambda x, inplace: F.hardswish(x, inplace=inplace)  # noqa: E731


def masked_activation(x, kind: str = "relu6", step: bool = False, inplace: bool = False):
    """Functional form: ``kind`` in relu / relu6 / hardswish (hardswish needs ``step=True``)."""
    if kind == "relu":
        return _MaskedActFn.apply(x, _RELU_OP, 0.0, float("inf"), step, inplace)
    if kind == "relu6":
        return _MaskedActFn.apply(x, _clamp_op(0.0, 6.0), 0.0, 6.0, step, inplace)
    if kind == "hardswish" and step:
        return _MaskedActFn.apply(x, _HSWISH_OP, 0.0, 0.0, True, inplace)
    raise ValueError(f"masked_activation: unsupported kind={kind!r} step={step}")


class _StepMixin:
    _step_backward: bool = False  # MobileTL's approximate backward, off by default


class MemReLU(_StepMixin, nn.ReLU):
    """``nn.ReLU`` keeping a bit-packed mask for backward."""

    def forward(self, x):
        if _engine_off(x) or not x.requires_grad:
            return super().forward(x)
        return _MaskedActFn.apply(x, _RELU_OP, 0.0, float("inf"), self._step_backward, self.inplace)


def _hardtanh_forward(self, x):
    if _engine_off(x) or not x.requires_grad:
        return nn.Hardtanh.forward(self, x)
    lo, hi = float(self.min_val), float(self.max_val)
    return _MaskedActFn.apply(x, _clamp_op(lo, hi), lo, hi, self._step_backward, self.inplace)


class MemHardtanh(_StepMixin, nn.Hardtanh):
    """``nn.Hardtanh`` (e.g. ``Hardtanh(0, 6)``) keeping a bit-packed mask."""

    forward = _hardtanh_forward


class MemReLU6(_StepMixin, nn.ReLU6):
    """``nn.ReLU6`` keeping a bit-packed mask."""

    forward = _hardtanh_forward


class MemHardswish(_StepMixin, nn.Hardswish):
    """``nn.Hardswish``: exact PyTorch backward (keeps its input) unless step backward is on."""

    def forward(self, x):
        if not self._step_backward or _engine_off(x) or not x.requires_grad:
            return super().forward(x)
        return _MaskedActFn.apply(x, _HSWISH_OP, 0.0, 0.0, True, self.inplace)


def set_step_backward(module: nn.Module, enabled: bool = True) -> int:
    """MobileTL: approximate ReLU6 / ReLU / Hardswish backward by ``1[x >= 0]`` under ``module``.

    Applies the engine to ``module`` first if needed. Returns how many activations changed.
    """
    apply_engine(module)
    n = 0
    for m in module.modules():
        if isinstance(m, _StepMixin):
            if enabled:
                m._step_backward = True
            elif "_step_backward" in m.__dict__:
                del m._step_backward
            n += 1
    return n


# ----------------------------------------------------------------------------- swapping
_SWAP: dict[type, type] = {
    nn.Conv2d: MemConv2d,
    nn.Linear: MemLinear,
    nn.BatchNorm2d: MemBatchNorm2d,
    nn.ReLU: MemReLU,
    nn.ReLU6: MemReLU6,
    nn.Hardtanh: MemHardtanh,
    nn.Hardswish: MemHardswish,
    nn.AvgPool2d: MemAvgPool2d,
    nn.MaxPool2d: MemMaxPool2d,
}

try:  # timm's fused BN + drop + act
    from timm.layers.norm_act import BatchNormAct2d as _TimmBNAct

    class MemBatchNormAct2d(_TimmBNAct):
        """timm ``BatchNormAct2d``: the engine's batch norm, then its own drop and act modules."""

        def forward(self, x):
            if not _bn_uses_engine(self, x):
                return super().forward(x)
            return self.act(self.drop(_engine_batch_norm(self, x)))

    _SWAP[_TimmBNAct] = MemBatchNormAct2d
    __all__.append("MemBatchNormAct2d")
except ImportError:  # pragma: no cover - timm is a dependency
    pass

try:  # timm's weight-standardised conv (Rep-Net / TinyTL side modules)
    from timm.layers import StdConv2d as _TimmStdConv2d

    class MemStdConv2d(_TimmStdConv2d):
        """timm ``StdConv2d`` keeping its raw weight instead of the standardised copy."""

        def forward(self, x):
            if (_engine_off(x) or self.padding_mode != "zeros" or isinstance(self.padding, str)
                    or not (x.requires_grad or self.weight.requires_grad or _wants_grad(self.bias))):
                return super().forward(x)
            return _StdConv2dFn.apply(x, self.weight, self.bias, self.eps, self.stride, self.padding,
                                      self.dilation, self.groups)

    _SWAP[_TimmStdConv2d] = MemStdConv2d
    __all__.append("MemStdConv2d")
except ImportError:  # pragma: no cover
    pass


def _padded_conv_engine(base: type, pre_pad: Callable) -> type:
    """Engine class for a conv subclass whose forward is ``F.conv2d(pre_pad(self, x), ...)`` with
    its numeric ``padding`` (TF-style "same" convs): the padding keeps nothing for backward
    (its gradient is a slice), the frozen conv keeps only its weight."""

    def forward(self, x):
        if _engine_off(x) or self._weight_trains() or not (x.requires_grad or _wants_grad(self.bias)):
            return base.forward(self, x)
        pad = _numeric_padding(self)
        if pad is None:
            return base.forward(self, x)
        wparts, dq = self._frozen_weight()
        return frozen_conv2d(pre_pad(self, x), self.bias, wparts, dq, self.stride, pad, self.dilation, self.groups)

    name = f"Mem{base.__name__}"
    cls = type(name, (_WeightMixin, base),
               {"forward": forward, "__module__": __name__, "__qualname__": name,
                "__doc__": f"``{base.__module__}.{base.__name__}`` that keeps nothing for backward when frozen."})
    globals()[name] = cls  # importable by name: models stay picklable
    __all__.append(name)
    return cls


try:  # timm's TF-"same" conv (tf_* models): pads in forward, then a plain conv
    from timm.layers import Conv2dSame as _TimmConv2dSame
    from timm.layers.padding import pad_same as _pad_same

    _SWAP[_TimmConv2dSame] = _padded_conv_engine(
        _TimmConv2dSame, lambda m, x: _pad_same(x, m.weight.shape[-2:], m.stride, m.dilation))
except ImportError:  # pragma: no cover
    pass

try:  # EfficientNet-Lite (efficientnet-lite-pytorch): a static ZeroPad2d module, then a plain conv
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding as _StaticSame

    _SWAP[_StaticSame] = _padded_conv_engine(_StaticSame, lambda m, x: m.static_padding(x))
except ImportError:  # pragma: no cover - an optional offline package
    pass

_UNSWAP: dict[type, type] = {v: k for k, v in _SWAP.items()}
ENGINE_TYPES: tuple[type, ...] = tuple(_SWAP.values())


def apply_engine(model: nn.Module) -> nn.Module:
    """Switch ``model`` to the memory engine, in place (idempotent); returns ``model``.

    Every module whose type is exactly one of ``nn.Conv2d, nn.Linear, nn.BatchNorm2d,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.AvgPool2d`` (and timm ``BatchNormAct2d``,
    ``StdConv2d``, ``Conv2dSame``, EfficientNet-Lite's ``Conv2dStaticSamePadding``) gets the
    engine subclass; other subclasses are left as they are (plain PyTorch).
    """
    for m in model.modules():
        new = _SWAP.get(type(m))
        if new is not None:
            m.__class__ = new
    return model


def remove_engine(model: nn.Module) -> nn.Module:
    """Restore plain PyTorch modules (8-bit weights are dequantised back to float first)."""
    for m in model.modules():
        if hasattr(m, "dequantize_"):  # 8-bit frozen weights (memory.quant)
            m.dequantize_()
        old = _UNSWAP.get(type(m))
        if old is not None:
            m.__class__ = old
    return model


def engine_applied(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs on the engine."""
    return any(isinstance(m, ENGINE_TYPES) for m in model.modules())
