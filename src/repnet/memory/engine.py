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
``native_batch_norm_backward``), so gradients equal plain PyTorch's (tested in float64 on every
method x backbone against plain PyTorch in the same layout, to 1e-6 of each tensor's scale - plain
PyTorch NCHW against NHWC differs by up to 2.3e-7 of it - and with 8-bit frozen weights against
plain PyTorch holding the same dequantised weights).

Beyond what is kept, the step's *peak* (``repnet.memory.profile``'s ``peak_mb``) is also the
layers' transient buffers, so the engine also:

* runs the network channels-last (NHWC): oneDNN's CPU convolutions then read and write the
  tensors as they are (on NCHW each one reorders its input or output into a blocked copy);
* normalises a frozen conv's output in place when the norm follows it in an ``nn.Sequential``
  (ops.norm ``CONSUMABLE``), makes the 1-bit masks slice by slice, and applies a mask or a frozen
  norm's scale to the incoming gradient in place when no one else holds that gradient
  (ops.base ``owned``);
* runs each frozen inverted-residual core ([1x1 expansion ->] depthwise -> 1x1 projection) in
  channel slices, so its wide maps are never whole (ops.fused).

Functional calls (``F.relu``, ``F.avg_pool2d``, ...) inside ``forward`` methods are not seen
by the class swap: use modules, or the ops' functional forms (:func:`avg_pool2d`,
:func:`masked_activation`, :func:`frozen_conv2d`, :func:`frozen_linear`).

Where it lives
--------------
One family of layers per module of :mod:`repnet.memory.ops` (``conv``, ``norm``,
``activations``, ``pooling``, ``fused``; ``masks`` packs the 1-bit masks), each with its engine classes,
its autograd Function and its analytic rule. This file is the one swap table built from them,
and the functions that apply it.
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
