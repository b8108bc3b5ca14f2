"""Training memory: the engine, its measurement, and the papers' analytic model.

* :mod:`.engine` - frozen layers that keep (almost) nothing for backward (``apply_engine``;
  the default execution mode of :func:`repnet.get_model`),
* :mod:`.quant` - frozen weights stored in 8 bits; :mod:`.int8` - INT8 training of the side network,
* :mod:`.measure` - what autograd really keeps, and the exact peak of a training step's live tensors,
* :mod:`.analytic` - the papers' per-layer rules (their MB figures; docs/memory.md),
* :func:`profile` - all three side by side for one model.
"""
from __future__ import annotations

import torch
from torch import nn

from repnet.memory.analytic import AnalyticReport, analyze, format_breakdown
from repnet.memory.engine import apply_engine, engine_applied, remove_engine, set_step_backward
from repnet.memory.measure import (OPTIMIZER_STATE_BYTES, measure_peak_bytes, measure_saved, measure_saved_bytes,
                                   measure_tensor_peak)
from repnet.memory.quant import quantize_frozen_weights

__all__ = ["apply_engine", "remove_engine", "engine_applied", "set_step_backward", "quantize_frozen_weights",
           "analyze", "AnalyticReport", "format_breakdown", "measure_saved_bytes", "measure_saved",
           "measure_peak_bytes", "measure_tensor_peak", "profile", "breakdown"]


def profile(model: nn.Module, *, batch_size: int = 8, image_size: int | None = None, measure: bool = True,
            peak: bool = True, rss: bool = False, device: str | torch.device | None = None, seed: int = 0,
            order: str = "run", optimizer: str = "adam") -> dict:
    """Training-memory profile of one model: the papers' analytic figure, what autograd keeps, and
    the measured peak of a training step, with their breakdowns.

    ``model`` is an ``nn.Module`` (e.g. a :class:`~repnet.methods.TransferModel`; build it with
    ``pretrained=False``: memory does not depend on the weights; with ``frozen_bits`` to hold the
    frozen weights in 8 bits, as the papers count them). ``device``: where to measure (default:
    where the model is). ``optimizer``: ``adam`` or ``sgd`` (momentum 0.9), as the training loop.

    Returned keys (MB = 1e6 bytes; per ``batch_size``):

    * analytic (docs/memory.md): ``analytic_mb`` (the papers' figure: peak activation x batch + params,
      1 B per frozen and 4 B per trainable parameter); ``analytic_peak_activation_mb``;
      ``analytic_param_mb``; ``analytic_saved_mb`` (kept for backward);
      ``analytic_frozen_bn_extra_mb`` (kept by frozen norms using batch statistics, which the
      papers do not count); ``analytic_with_optimizer_mb`` (plus each trainable parameter's
      gradient and optimizer state: 12 B for Adam, 8 B for SGD + momentum) and its
      ``analytic_breakdown_mb``;
    * ``measured_saved_mb`` (``measure``): autograd's saved tensors over one forward;
    * ``peak_mb`` (``peak``): the exact peak of live tensor bytes over one steady-state training
      step (PyTorch's memory profiler: :func:`.measure.measure_tensor_peak`) - frozen weights and
      buffers, trained weights + gradients + optimizer state, kept activations and the forward /
      backward buffers alive at that moment (``peak_breakdown_mb``; PyTorch's own categories in
      ``peak_by_kind_mb``) - less the input batch, which the analytic figure leaves out too (it
      is the data loader's: ``peak_with_input_mb`` adds it); ``peak_over_analytic`` =
      ``peak_mb / analytic_with_optimizer_mb``;
    * ``rss_peak_mb`` (``rss``, CPU): the whole process's peak RSS increase over one step in a
      fresh subprocess (coarse: allocator slack, thread stacks, pages); on CUDA
      ``cuda_allocator_peak_mb`` (the caching allocator's peak beyond what was resident);
    * ``trainable_params``, ``total_params``, ``engine``, ``frozen_bits``.

    Unmeasured figures are None. ``order``: the analytic model's execution order (``"run"`` /
    ``"paper"``, see :mod:`.analytic`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("profile takes a model: build it with repnet.get_model(backbone, method, ...)")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    if image_size is None:
        image_size = int(getattr(model, "image_size", 224))
    if device is not None:
        model.to(device)
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    rep = analyze(model, image_size, order=order)
    state = OPTIMIZER_STATE_BYTES[optimizer] * rep.trainable_params / 1e6
    frozen = (rep.total_params - rep.trainable_params) / 1e6  # 1 B each
    out = {
        "analytic_order": order,
        "optimizer": optimizer,
        "trainable_params": rep.trainable_params,
        "total_params": rep.total_params,
        "analytic_mb": rep.total_mb(batch_size),
        "analytic_peak_activation_mb": rep.peak_activation_bytes * batch_size / 1e6,
        "analytic_param_mb": rep.param_bytes / 1e6,
        "analytic_saved_mb": rep.saved_mb(batch_size),
        "analytic_frozen_bn_extra_mb": rep.frozen_bn_extra_mb(batch_size),
        "analytic_with_optimizer_mb": rep.total_mb(batch_size) + state,
        "analytic_breakdown_mb": {"frozen_weights": frozen, "trainable_weights": rep.param_bytes / 1e6 - frozen,
                                  "gradients_and_optimizer_state": state,
                                  "peak_activation": rep.peak_activation_bytes * batch_size / 1e6},
        "measured_saved_mb": None,
        "peak_mb": None, "peak_with_input_mb": None, "peak_breakdown_mb": None, "peak_by_kind_mb": None,
        "peak_over_analytic": None, "peak_kind": None,
        "rss_peak_mb": None, "cuda_allocator_peak_mb": None,
        "engine": engine_applied(model),
        "frozen_bits": getattr(model, "frozen_bits", None),
    }
    g = torch.Generator().manual_seed(seed)
    nc = getattr(model, "num_classes", None)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g, dtype=dtype).to(dev)
    y = torch.randint(0, nc or 1, (batch_size,), generator=g).to(dev)

    def loss_fn(o):
        return nn.functional.cross_entropy(o, y) if o.dim() == 2 and nc else o.float().sum()

    if measure:
        out["measured_saved_mb"] = measure_saved_bytes(model, x, loss_fn) / 1e6
    if peak:
        t = measure_tensor_peak(model, x, y if nc else None, optimizer=optimizer)
        out["peak_mb"] = (t["peak_bytes"] - t["input_bytes"]) / 1e6
        out["peak_with_input_mb"] = t["peak_bytes"] / 1e6
        out["peak_breakdown_mb"] = {k: v / 1e6 for k, v in t["breakdown"].items()}
        out["peak_by_kind_mb"] = {k: v / 1e6 for k, v in t["by_kind"].items()}
        out["peak_over_analytic"] = out["peak_mb"] / out["analytic_with_optimizer_mb"]
        out["peak_kind"] = "live tensors"
    if rss:
        b = measure_peak_bytes(model, x, y if nc else None, optimizer=optimizer)
        if b is not None:
            out["cuda_allocator_peak_mb" if x.is_cuda else "rss_peak_mb"] = b / 1e6
    return out


def breakdown(model: nn.Module, image_size: int | None = None, batch_size: int = 8, top: int | None = None) -> str:
    """The per-layer table of the papers' analytic model (docs/memory.md) for ``model``, scaled to ``batch_size``.

    ``top``: only the ``top`` layers that keep the most. Example::

        print(repnet.memory.breakdown(repnet.get_model("proxylessnas_mobile", "tinytl_lb", 102), 224))
    """
    size = image_size or int(getattr(model, "image_size", 224))
    return format_breakdown(analyze(model, size), batch_size, top)
