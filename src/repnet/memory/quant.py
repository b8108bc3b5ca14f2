"""Frozen weights stored in 8 bits (the papers' setting: frozen parameters cost 1 byte).

``quantize_frozen_weights(model, scheme)`` replaces the float ``weight`` of every frozen ``Conv2d`` /
``Linear`` by 8-bit codes plus a tiny table, dequantised on the fly in forward and backward (a transient
float copy, never kept): ``"kmeans"`` (the papers': a 256-entry codebook per tensor) or ``"linear"``
(per-output-channel symmetric int8, ``w = codes * scale``). A read-only ``weight`` property keeps code
that reads ``m.weight`` working; trainable weights are never quantised; the quantised classes are
engine classes, and :func:`~repnet.memory.engine.remove_engine` dequantises back to float.
docs/memory.md, "Frozen weights in 8 bits".
"""
from __future__ import annotations

import torch
from torch import nn

from repnet.errors import RepnetError
from repnet.memory.engine import MemConv2d, MemLinear, apply_engine

__all__ = ["quantize_frozen_weights", "dequantize_module", "is_quantized", "kmeans_codebook",
           "QuantConv2d", "QuantLinear", "PlainQuantConv2d", "PlainQuantLinear", "SCHEMES"]

SCHEMES = ("kmeans", "linear")


def _kmeans_dequant(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook.index_select(0, codes.reshape(-1).int()).view(codes.shape)


def _linear_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale.view(-1, *([1] * (codes.dim() - 1)))


class _QuantMixin:
    """Weight from 8-bit codes; never trains."""

    _scheme: str

    def _frozen_weight(self):
        if self._scheme == "kmeans":
            return (self.weight_codes, self.weight_codebook), _kmeans_dequant
        return (self.weight_codes, self.weight_scale), _linear_dequant

    def _weight_trains(self) -> bool:
        return False

    def dequantize_(self) -> None:
        """Back to a float weight (``remove_engine`` calls this before restoring plain PyTorch)."""
        dequantize_module(self)

    @property
    def weight(self) -> torch.Tensor:  # the dequantised float weight (a transient copy)
        parts, fn = self._frozen_weight()
        return fn(*parts)


class QuantConv2d(_QuantMixin, MemConv2d):
    """Engine conv whose frozen weight is stored in 8 bits."""


class QuantLinear(_QuantMixin, MemLinear):
    """Engine linear layer whose frozen weight is stored in 8 bits."""


class PlainQuantConv2d(_QuantMixin, nn.Conv2d):
    """Plain PyTorch conv (what ``torch.export`` traces for a device program) with its frozen weight
    in 8 bits: the dequantisation is part of the traced graph."""


class PlainQuantLinear(_QuantMixin, nn.Linear):
    """Plain PyTorch linear layer with its frozen weight in 8 bits."""


_QUANT = {MemConv2d: QuantConv2d, MemLinear: QuantLinear, nn.Conv2d: PlainQuantConv2d, nn.Linear: PlainQuantLinear}
_UNQUANT = {v: k for k, v in _QUANT.items()}


def is_quantized(m: nn.Module) -> bool:
    return type(m) in _UNQUANT


def kmeans_codebook(w: torch.Tensor, k: int = 256, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of ``w``'s values: (uint8 codes shaped like ``w``, sorted codebook of ``k``).

    Deep Compression's recipe: linear initialisation over [min, max], then Lloyd iterations.
    In 1-D the clusters are contiguous runs of the sorted values, so one iteration is ``k``
    binary searches plus prefix sums. Assignment is to the
    nearest centroid; a tensor with at most ``k`` distinct values is represented exactly.
    """
    flat = w.detach().reshape(-1).to(torch.float64).cpu()
    srt = flat.sort().values
    distinct = torch.cat([srt[:1], srt[1:][srt[1:] != srt[:-1]]])
    if distinct.numel() <= k:
        cent = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
    else:
        csum = torch.cat([srt.new_zeros(1), srt.cumsum(0)])
        n = srt.numel()
        cent = torch.linspace(float(srt[0]), float(srt[-1]), k, dtype=torch.float64)
        for _ in range(iters):
            pos = torch.searchsorted(srt, (cent[1:] + cent[:-1]) / 2, right=True)
            lo = torch.cat([pos.new_zeros(1), pos])
            hi = torch.cat([pos, pos.new_full((1,), n)])
            counts = (hi - lo).to(torch.float64)
            # stays sorted: cluster means follow their runs, an empty cluster keeps its old
            # centroid, which lies between its neighbours' new means
            new = torch.where(counts > 0, (csum[hi] - csum[lo]) / counts.clamp(min=1), cent)
            if torch.equal(new, cent):
                break
            cent = new
    idx = torch.bucketize(flat, (cent[1:] + cent[:-1]) / 2)
    return idx.to(torch.uint8).view(w.shape).to(w.device), cent.to(device=w.device, dtype=w.dtype)


def _quantize_module(m: nn.Module, scheme: str) -> None:
    w = m.weight.detach()
    del m._parameters["weight"]
    m.__class__ = _QUANT[type(m)]
    m._scheme = scheme
    if scheme == "kmeans":
        codes, table = kmeans_codebook(w)
        m.register_buffer("weight_codes", codes.to(w.device))
        m.register_buffer("weight_codebook", table.to(w.device))
    else:
        amax = w.abs().reshape(w.shape[0], -1).amax(1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        codes = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
        m.register_buffer("weight_codes", codes)
        m.register_buffer("weight_scale", scale)


def quantize_frozen_weights(model: nn.Module, scheme: str = "kmeans", engine: bool = True) -> nn.Module:
    """Store every frozen Conv2d / Linear weight of ``model`` in 8 bits (in place).

    Returns ``model``. Idempotent; layers whose weight trains keep float weights. ``engine=False``
    keeps plain PyTorch layers (:class:`PlainQuantConv2d`: for a traced device program).
    """
    if scheme not in SCHEMES:
        raise RepnetError(f"unknown quantisation scheme '{scheme}'; choose from: {', '.join(SCHEMES)}")
    if engine:
        apply_engine(model)
    for m in model.modules():
        if type(m) in _QUANT and not m.weight.requires_grad:
            _quantize_module(m, scheme)
    return model


def dequantize_module(m: nn.Module) -> None:
    """Turn a quantised module back into an engine module with a (frozen) float weight."""
    w = m.weight.detach().clone()
    for name in ("weight_codes", "weight_codebook", "weight_scale"):
        m._buffers.pop(name, None)
    m.__class__ = _UNQUANT[type(m)]
    m.__dict__.pop("_scheme", None)
    m.weight = nn.Parameter(w, requires_grad=False)


def quantized_weight_numel(model: nn.Module) -> int:
    """Number of weights stored as 8-bit codes (1 byte each)."""
    return sum(m.weight_codes.numel() for m in model.modules() if is_quantized(m))
