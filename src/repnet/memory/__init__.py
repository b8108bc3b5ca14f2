"""Training memory: the engine, its measurement, and the papers' analytic model.

* :mod:`.engine` - frozen layers that keep (almost) nothing for backward (``apply_engine``;
  the default execution mode of :func:`repnet.get_model`),
* :mod:`.quant` - frozen weights stored in 8 bits,
* :mod:`.measure` - what autograd really keeps, and the real peak of a training step,
* :mod:`.analytic` - SPEC §7's per-layer rules (the papers' MB figures),
* :func:`profile` - all three side by side for one model.
"""
from __future__ import annotations

import torch
from torch import nn

from .analytic import AnalyticReport, analyze, format_breakdown
from .engine import apply_engine, engine_applied, remove_engine, set_step_backward
from .measure import measure_peak_bytes, measure_saved, measure_saved_bytes, measure_tensor_peak
from .quant import quantize_frozen_weights

__all__ = ["apply_engine", "remove_engine", "engine_applied", "set_step_backward", "quantize_frozen_weights",
           "analyze", "AnalyticReport", "format_breakdown", "measure_saved_bytes", "measure_saved",
           "measure_peak_bytes", "measure_tensor_peak", "profile", "breakdown"]


def profile(model: nn.Module, *, batch_size: int = 8, image_size: int | None = None, measure: bool = True,
            peak: bool = True, device: str | torch.device | None = None, seed: int = 0,
            order: str = "run", tensor_peak: bool = False) -> dict:
    """Training-memory profile of one model: analytic, measured kept-for-backward, peak.

    ``model`` is an ``nn.Module`` (e.g. a :class:`~repnet.methods.TransferModel`; build it with
    ``pretrained=False``: memory does not depend on the weights).
    ``device``: where to measure (default: where the model is; CUDA gives the exact peak).

    Returned keys (MB = 1e6 bytes; per ``batch_size``):

    ``trainable_params``, ``total_params``; ``analytic_mb`` (the papers' figure: peak
    activation x batch + params, SPEC §7); ``analytic_peak_activation_mb``;
    ``analytic_param_mb``; ``analytic_saved_mb`` (what the rules say is kept for backward);
    ``analytic_frozen_bn_extra_mb`` (kept by frozen norms using batch statistics, which the
    papers do not count); ``measured_saved_mb`` (autograd's saved tensors, one forward);
    ``peak_mb`` (one training step's peak beyond what was resident, see
    :mod:`.measure`); ``peak_kind`` (``cuda-allocator`` / ``cpu-rss`` / None);
    ``analytic_with_optimizer_mb`` (the analytic figure + a gradient and Adam's two moments per
    trainable parameter: 12 B more each); ``tensor_peak_mb`` / ``tensor_peak_by_kind_mb``
    (``tensor_peak=True``: the exact live-tensor peak of a steady-state Adam step, everything
    included, and what was alive at that moment by kind - :func:`.measure.measure_tensor_peak`);
    ``engine`` (whether the engine is on). Unmeasured figures are None. ``order``: the analytic
    model's execution order (``"run"`` / ``"paper"``, see :mod:`.analytic`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("profile takes a model: build it with repnet.get_model(backbone, method, ...)")
    if image_size is None:
        image_size = int(getattr(model, "image_size", 224))
    if device is not None:
        model.to(device)
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    rep = analyze(model, image_size, order=order)
    out = {
        "analytic_order": order,
        "trainable_params": rep.trainable_params,
        "total_params": rep.total_params,
        "analytic_mb": rep.total_mb(batch_size),
        "analytic_peak_activation_mb": rep.peak_activation_bytes * batch_size / 1e6,
        "analytic_param_mb": rep.param_bytes / 1e6,
        "analytic_saved_mb": rep.saved_mb(batch_size),
        "analytic_frozen_bn_extra_mb": rep.frozen_bn_extra_mb(batch_size),
        "analytic_with_optimizer_mb": rep.total_mb(batch_size) + 12 * rep.trainable_params / 1e6,
        "tensor_peak_mb": None,
        "tensor_peak_by_kind_mb": None,
        "measured_saved_mb": None,
        "peak_mb": None,
        "peak_kind": None,
        "engine": engine_applied(model),
    }
    g = torch.Generator().manual_seed(seed)
    nc = getattr(model, "num_classes", None)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g, dtype=dtype).to(dev)
    y = torch.randint(0, nc or 1, (batch_size,), generator=g).to(dev)

    def loss_fn(o):
        return nn.functional.cross_entropy(o, y) if o.dim() == 2 and nc else o.float().sum()

    if measure:
        out["measured_saved_mb"] = measure_saved_bytes(model, x, loss_fn) / 1e6
    if tensor_peak:
        t = measure_tensor_peak(model, x, y if nc else None)
        out["tensor_peak_mb"] = t["peak_bytes"] / 1e6
        out["tensor_peak_by_kind_mb"] = {k: v / 1e6 for k, v in t["by_kind"].items()}
    if peak:
        b = measure_peak_bytes(model, x, y if nc else None)
        if b is not None:
            out["peak_mb"] = b / 1e6
            out["peak_kind"] = "cuda-allocator" if x.is_cuda else "cpu-rss"
    return out


def breakdown(model: nn.Module, image_size: int | None = None, batch_size: int = 8, top: int | None = None) -> str:
    """The per-layer table of the analytic model (SPEC §7) for ``model``, scaled to ``batch_size``.

    ``top``: only the ``top`` layers that keep the most. Example::

        print(repnet.memory.breakdown(repnet.get_model("proxylessnas_mobile", "tinytl_lb", 102), 224))
    """
    size = image_size or int(getattr(model, "image_size", 224))
    return format_breakdown(analyze(model, size), batch_size, top)
