"""Pooling keeps (almost) nothing: average pooling only its input's shape, max pooling a 1-byte
window arg-max per output (PyTorch: the input and int64 indices).

Analytic rule: average pooling keeps nothing; max pooling keeps 1 byte per output element when a
gradient passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from repnet.memory.ops.base import engine_off, pair

class AvgPool2dFn(torch.autograd.Function):
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
    if engine_off(x) or not x.requires_grad or x.dim() != 4:
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    k = pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else pair(stride)
    return AvgPool2dFn.apply(x, list(k), list(s), list(pair(padding)), ceil_mode, count_include_pad,
                              divisor_override)


class MemAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` whose backward keeps nothing."""

    def forward(self, x):
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)


class MaxPool2dFn(torch.autograd.Function):
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
        kernel = pair(self.kernel_size)
        if (engine_off(x) or not x.requires_grad or self.return_indices or x.dim() != 4
                or kernel[0] * kernel[1] > 256):
            return super().forward(x)
        stride = pair(self.stride if self.stride is not None else self.kernel_size)
        return MaxPool2dFn.apply(x, kernel, stride, pair(self.padding), pair(self.dilation), self.ceil_mode)


SWAP: dict[type, type] = {nn.AvgPool2d: MemAvgPool2d, nn.MaxPool2d: MemMaxPool2d}


def _claims(m: nn.Module) -> bool:
    return isinstance(m, nn.MaxPool2d)


def _rule(m, x, out, ctx) -> tuple[float, float, float]:
    return (float(out.numel()) if ctx.grad_in else 0.0), 0.0, 0.0


RULE = (_claims, _rule)
