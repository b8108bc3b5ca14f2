"""Bit-packed 1-bit masks: what a ReLU-like activation keeps for backward (numel / 8 bytes).

:func:`pack_mask` makes the mask of where an activation's input lies inside its linear range and packs
it eight elements to a byte, slice by slice (``MASK_SLICE``) so that no full-size boolean tensor
exists; :func:`apply_mask` unpacks it into the incoming gradient, in place when the gradient is owned.
:func:`pack_bits` / :func:`unpack_bits` are the packing itself.
"""
from __future__ import annotations

import math

import torch

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


#: elements per slice when a mask is made or applied (a multiple of 8: whole mask bytes): the
#: only temporaries are one slice's comparisons and looked-up words, never an activation-sized tensor
MASK_SLICE = 1 << 18


def flat_memory(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements in memory order as a 1-D view (contiguous or channels-last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # the permuted tensor is contiguous: a view
    return None


def _slices(n: int):
    for s in range(0, n, MASK_SLICE):
        yield s, min(n, s + MASK_SLICE)


def pack_mask(x: torch.Tensor, lo: float, hi: float, step: bool = False) -> tuple[torch.Tensor, bool]:
    """The bit-packed mask of ``lo < x < hi`` (``x >= 0`` if ``step``) in ``x``'s memory order, made
    slice by slice; returns ``(packed, channels_last)``, the layout the bits follow."""
    flat = flat_memory(x)
    if flat is None:
        x = x.contiguous()
        flat = x.view(-1)
    cl = not x.is_contiguous()
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    for s, e in _slices(flat.numel()):
        xs = flat[s:e]
        if step:
            packed = pack_bits(xs >= 0)
        elif hi == float("inf"):
            packed = pack_bits(xs > lo)
        else:
            packed = pack_bits(xs > lo, xs < hi)
        out[s // 8: s // 8 + packed.numel()] = packed
    return out, cl


def apply_mask(g: torch.Tensor, packed: torch.Tensor, channels_last: bool = False,
               inplace: bool = False) -> torch.Tensor:
    """``where(mask, g, 0)`` for a mask from :func:`pack_mask` (bits in the layout it reports).

    ``inplace=True`` (``g`` is the caller's to overwrite): ``g``'s masked-out elements are zeroed
    in place. Either way the work goes slice by slice, so no gradient-sized temporary is made;
    a gradient in another layout than the mask's is first copied into it (that copy is then
    written in place).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not g.is_contiguous(memory_format=fmt):
        g, inplace = g.contiguous(memory_format=fmt), True
    out = g if inplace else torch.empty_like(g, memory_format=fmt)
    src, dst = flat_memory(g), flat_memory(out)
    it = _INT_OF.get(g.dtype)
    table = _table(it or torch.bool, packed.device)
    for s, e in _slices(src.numel()):
        bits = table.index_select(0, packed[s // 8:(e + 7) // 8].int()).view(-1)[: e - s]
        if it is None:
            dst[s:e] = src[s:e].where(bits, 0)
        else:
            torch.bitwise_and(src[s:e].view(it), bits, out=dst[s:e].view(it))
    return out
