"""The training-memory engine: frozen layers that keep (almost) nothing for backward.

In plain PyTorch a frozen conv still saves its input, a frozen batch norm too, and ReLU a float
tensor where one bit per element would do; the papers' figures assume those savings, and the engine
makes them real: :func:`apply_engine` swaps the class of every leaf module it knows for one whose
autograd Function keeps nothing (conv / linear / frozen BN) or a bit-packed mask, with PyTorch's own
backward kernels (gradients unchanged, tested in float64), and also lowers the step's peak (NHWC,
in-place norms, fused inverted-residual cores). This file is the one swap table, collected from the op
modules of :mod:`repnet.memory.ops`, and the functions that apply it. Why, rule by rule, and how:
docs/memory.md, "The engine".
"""
from __future__ import annotations

import torch
from torch import nn

from repnet.memory.ops import SWAP as _OP_SWAP
from repnet.memory.ops.activations import (MaskedActFn, MemHardswish, MemHardtanh, MemReLU, MemReLU6, StepBackwardMixin,
                                           masked_activation)
from repnet.memory.ops.conv import (FEEDS_NORM, MemConv2d, MemLinear, FrozenConv2dFn, FrozenLinearFn,
                                    StdConv2dFn, conv2d_input_grad, frozen_conv2d,
                                    frozen_linear)
from repnet.memory.ops.fused import FusedInvertedCoreFn, mark_fusable, unmark_fusable
from repnet.memory.ops.masks import apply_mask, pack_bits, unpack_bits
from repnet.memory.ops.norm import MemBatchNorm2d, FrozenBatchNormFn, InplaceFrozenBatchNormFn
from repnet.memory.ops.pooling import MemAvgPool2d, MemMaxPool2d, AvgPool2dFn, avg_pool2d

__all__ = [
    "apply_engine", "remove_engine", "engine_applied", "set_step_backward", "ENGINE_TYPES",
    "pack_bits", "unpack_bits", "apply_mask", "frozen_conv2d", "frozen_linear", "masked_activation", "avg_pool2d",
    "conv2d_input_grad", "MemConv2d", "MemLinear", "MemBatchNorm2d", "MemReLU", "MemReLU6", "MemHardtanh",
    "MemHardswish", "MemAvgPool2d", "MemMaxPool2d",
    # the autograd Functions the engine classes run (tests count their calls)
    "MaskedActFn", "FrozenConv2dFn", "FrozenLinearFn", "StdConv2dFn", "FrozenBatchNormFn", "InplaceFrozenBatchNormFn",
    "FusedInvertedCoreFn", "AvgPool2dFn",
]
#: The one swap table: plain class -> engine class (collected from every op module).
_SWAP: dict[type, type] = dict(_OP_SWAP)
_UNSWAP: dict[type, type] = {v: k for k, v in _SWAP.items()}
ENGINE_TYPES: tuple[type, ...] = tuple(_SWAP.values())
for _cls in ENGINE_TYPES:  # e.g. MemStdConv2d, MemBatchNormAct2d, the padded convs: reachable by name
    globals().setdefault(_cls.__name__, _cls)


def apply_engine(model: nn.Module) -> nn.Module:
    """Switch ``model`` to the memory engine, in place (idempotent); returns ``model``.

    Every module whose type is exactly a key of the swap table (``nn.Conv2d, nn.Linear,
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.AvgPool2d, nn.MaxPool2d``,
    timm ``BatchNormAct2d``, ``StdConv2d``, ``Conv2dSame``, EfficientNet-Lite's
    ``Conv2dStaticSamePadding``) gets the engine subclass; other subclasses are left as they are.
    """
    for m in model.modules():
        new = _SWAP.get(type(m))
        if new is not None:
            m.__class__ = new
    _mark_conv_norm_pairs(model)
    mark_fusable(model)  # expansion + depthwise pairs run in channel slices (ops.fused)
    # oneDNN's CPU convolutions read and write channels-last (NHWC) tensors as they are; on NCHW
    # tensors each one reorders its input or output into a blocked copy - a second activation
    # of the layer's size alive while it runs. 4-D weights go channels-last, and with them every
    # conv's output (the first conv converts the image), so the whole network stays NHWC.
    model.to(memory_format=torch.channels_last)
    return model


def _mark_conv_norm_pairs(model: nn.Module) -> None:
    """Mark each engine conv that an ``nn.Sequential`` runs right before a batch norm.

    In a Sequential the conv's output is read by the next module only, so a frozen norm with eval
    statistics may overwrite it (ops.norm ``CONSUMABLE``): the conv's output and the norm's are
    not alive side by side - in a high-resolution expansion layer, the step's largest pair of
    buffers. Anywhere else (a block's own ``forward``, where the code may read the conv's output
    again) nothing is marked.
    """
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            kids = list(seq.children())
            for a, b in zip(kids, kids[1:]):
                if isinstance(a, MemConv2d) and isinstance(b, nn.modules.batchnorm._BatchNorm) \
                        and isinstance(b, ENGINE_TYPES):
                    a.__dict__[FEEDS_NORM] = True


def remove_engine(model: nn.Module) -> nn.Module:
    """Restore plain PyTorch modules (8-bit weights are dequantised back to float first)."""
    unmark_fusable(model)
    for m in model.modules():
        if hasattr(m, "dequantize_"):  # 8-bit frozen weights (memory.quant)
            m.dequantize_()
        old = _UNSWAP.get(type(m))
        if old is not None:
            m.__class__ = old
        m.__dict__.pop(FEEDS_NORM, None)
    model.to(memory_format=torch.contiguous_format)
    return model


def engine_applied(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs on the engine."""
    return any(isinstance(m, ENGINE_TYPES) for m in model.modules())


def set_step_backward(module: nn.Module, enabled: bool = True) -> int:
    """MobileTL: approximate ReLU6 / ReLU / Hardswish backward by ``1[x >= 0]`` under ``module``.

    Applies the engine to ``module`` first if needed. Returns how many activations changed.
    """
    apply_engine(module)
    n = 0
    for m in module.modules():
        if isinstance(m, StepBackwardMixin):
            if enabled:
                m.step_backward = True
            elif "step_backward" in m.__dict__:
                del m.step_backward
            n += 1
    return n
