"""What every memory-saving op shares: when the engine steps aside, and the analytic model's units.

Each op module of this package holds one family of layers: the engine's class for it (a
subclass that keeps less for backward, registered in the module's ``SWAP``), its autograd
Function, and its rule in the papers' analytic model (docs/memory.md), ``RULE = (claims, rule)``:
``claims(m)`` says whether the rule covers module ``m``; ``rule(m, x, out, ctx)`` returns the
bytes ``(kept for backward, transient while it runs, kept only because norms use batch
statistics)`` per sample. ``ctx`` (:class:`RuleContext`) says whether a gradient reaches the
layer's input and which norms use batch statistics. ``repnet.memory.engine`` and
``repnet.memory.analytic`` collect every module's ``SWAP`` and ``RULE``: adding an op is one file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ACT_BYTES = 4  # float32 activations


@dataclass
class RuleContext:
    grad_in: bool                 # a gradient reaches this layer's input
    act_grad: bool                # an activation counts its mask (gradient passes, or masks="always")
    masks: str = "gradient"       # "gradient" or TinyTL's "always"
    batch_stats: set = field(default_factory=set)  # norm modules that use batch statistics


def weight_trains(m: nn.Module) -> bool:
    """Whether ``m``'s own weight trains (8-bit frozen weights never do)."""
    fn = getattr(m, "_weight_trains", None)
    if callable(fn):
        return bool(fn())
    w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
    return w is not None and w.requires_grad


def input_bytes(m: nn.Module) -> int:
    """Bytes per kept input element of a trained conv / linear: 1 for an INT8-trained layer with
    int8 activations (it keeps the input's int8 codes, ``repnet.memory.int8``), else 4."""
    cfg = getattr(m, "_int8", None)
    return 1 if cfg is not None and cfg.activations else ACT_BYTES


def identity(w: torch.Tensor) -> torch.Tensor:
    return w


def wants_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


def engine_off(x: torch.Tensor) -> bool:
    """Cases where the engine steps aside: autograd off, or autocast (dtype policy is PyTorch's)."""
    return not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)


def owned(g: torch.Tensor) -> bool:
    """Whether a backward may overwrite the gradient ``g`` it was handed (no one else can see it).

    Autograd hands a node's gradient to its backward and keeps no reference of its own when
    the tensor is the node's alone; a gradient shared with another branch (an add passes the
    same tensor to both of its inputs) is referenced twice until the other branch has run. So:
    one reference to the tensor (``_use_count``, the C++ count PyTorch's own gradient
    accumulation consults before it reuses a buffer), one tensor on its storage (no view, no
    base alive elsewhere: the storage's count is that tensor + the storage handle asked for here),
    and a dense layout (contiguous or channels-last) covering the whole storage (no expanded /
    strided gradient). Anything
    else: the caller computes out of place, as PyTorch does.
    """
    dense = g.is_contiguous() or (g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last))
    if g.requires_grad or not dense or g.storage_offset() != 0 or g._use_count() != 1:
        return False
    s = g.untyped_storage()
    return s.nbytes() == g.numel() * g.element_size() and torch._C._storage_Use_Count(s._cdata) == 2


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
