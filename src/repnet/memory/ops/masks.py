"""Bit-packed 1-bit masks: what a ReLU-like activation keeps for backward (numel / 8 bytes)."""
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


def apply_mask(g: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``where(mask, g, 0)`` for a mask packed by :func:`pack_bits` (same shape as ``g``)."""
    it = _INT_OF.get(g.dtype)
    if it is None:
        return g.where(unpack_bits(packed, g.shape), 0)
    words = _table(it, packed.device).index_select(0, packed.int()).view(-1)[: g.numel()].view(g.shape)
    return words.bitwise_and_(g.view(it)).view(g.dtype)
