"""The papers' analytic training-memory model (docs/memory.md, "The papers' analytic model"), evaluated
on the actual model.

One forward at batch 1 with hooks on every leaf layer, in the order the layers run; each layer's
bytes - kept for backward and transient while it runs - come from its op's ``RULE``
(:mod:`repnet.memory.ops`), so the engine and this model cannot drift. ``peak`` is the largest
transient + kept-so-far + residual held; ``total(batch) = peak * batch + params`` (4 B per trainable,
1 B per frozen parameter). It reproduces TinyTL's published figures (``masks="always"`` is TinyTL's
mask rule), and ``order="paper"`` counts Rep-Net's first module before the stem, as the released code
runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from repnet.memory.ops import RULES
from repnet.memory.ops.base import ACT_BYTES, RuleContext

__all__ = ["AnalyticReport", "LayerRow", "analyze", "param_bytes", "format_breakdown", "MASK_RULES"]

# the layer rules live with their ops (repnet.memory.ops: conv, norm, activations, pooling)


@dataclass
class LayerRow:
    name: str
    type: str
    in_numel: int
    out_numel: int
    kept_bytes: float
    transient_bytes: float
    trainable_params: int
    frozen_bn_extra_bytes: float = 0.0
    residual_bytes: float = 0.0  # held by enclosing residual blocks while this layer runs
    running_bytes: float = 0.0  # transient + kept before it + residual: this layer's candidate peak


@dataclass
class AnalyticReport:
    """Per-sample activation figures (bytes) and parameter bytes, per the rules above."""

    rows: list[LayerRow] = field(default_factory=list)
    peak_activation_bytes: float = 0.0
    kept_bytes: float = 0.0
    frozen_bn_extra_bytes: float = 0.0
    param_bytes: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    image_size: int = 0
    peak_layer: str = ""

    def total_mb(self, batch: int) -> float:
        """Paper figure: ``peak * batch + params`` in MB (1e6 bytes)."""
        return (self.peak_activation_bytes * batch + self.param_bytes) / 1e6

    def saved_mb(self, batch: int) -> float:
        """What the rules say is kept for backward, at ``batch``, in MB."""
        return self.kept_bytes * batch / 1e6

    def frozen_bn_extra_mb(self, batch: int) -> float:
        return self.frozen_bn_extra_bytes * batch / 1e6

    def breakdown(self, batch: int = 1, top: int | None = None) -> str:
        return format_breakdown(self, batch, top)


def _int8_master_numel(model: nn.Module) -> int:
    """Trainable weights held on their int8 grid (``repnet.memory.int8`` master="int8"): 1 byte each."""
    return sum(m.weight.numel() for m in model.modules()
               if getattr(m, "_int8", None) is not None and m._int8.master == "int8" and m.weight.requires_grad)


def param_bytes(model: nn.Module, trainable_bytes: int = 4, frozen_bytes: int = 1) -> tuple[float, int, int]:
    """(bytes, trainable count, total count): 4 B per trainable, 1 B per frozen parameter.

    8-bit weight codes (``quantize_frozen_weights``) count as frozen parameters; trainable
    weights kept on their int8 grid (``repnet.memory.int8``, master="int8") cost 1 B too.
    """
    from repnet.memory.quant import quantized_weight_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + quantized_weight_numel(model)
    on_grid = _int8_master_numel(model)
    nbytes = (trainable - on_grid) * trainable_bytes + on_grid * 1 + frozen * frozen_bytes
    return float(nbytes), trainable, trainable + frozen


def _residual_blocks(model: nn.Module, image_size: int) -> list[nn.Module]:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "describe") and hasattr(backbone, "blocks"):
        blocks = backbone.blocks()
        return [blocks[i.index] for i in backbone.describe(image_size) if i.residual]
    from repnet.backbones.base import has_shortcut

    return [m for m in model.modules() if list(m.children()) and has_shortcut(m)]


def _counted(m: nn.Module) -> bool:
    return not list(m.children()) or any(claims(m) for claims, _ in RULES)


MASK_RULES = ("gradient", "always")
ORDERS = ("run", "paper")


def analyze(model: nn.Module, image_size: int = 224, inputs: torch.Tensor | None = None,
            in_chans: int = 3, masks: str = "gradient", order: str = "run") -> AnalyticReport:
    """Evaluate the papers' analytic rules on ``model`` with one forward at batch 1.

    Which norms use batch statistics is read from ``model.train()`` (the training
    configuration); the forward itself runs in eval mode, so no running statistic changes.

    ``masks``: ``"gradient"`` (default) counts an activation's mask / input only where a
    gradient passes through it; ``"always"`` counts every one, as TinyTL's profiler does
    whenever anything in the model trains (its ``require_backward`` flag), even before the
    first trainable tensor where no gradient ever arrives.

    ``order``: ``"run"`` (this package's forward) or ``"paper"`` (a method's prelude modules
    counted before the backbone; docs/memory.md, "Execution order").
    """
    if masks not in MASK_RULES:
        raise ValueError(f"masks must be one of {MASK_RULES}, got {masks!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    p = next(model.parameters(), None)
    if inputs is None:
        dev = p.device if p is not None else "cpu"
        dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
        inputs = torch.zeros(1, in_chans, image_size, image_size, device=dev, dtype=dt)
    rep = AnalyticReport(image_size=image_size)
    rep.param_bytes, rep.trainable_params, rep.total_params = param_bytes(model)

    modes = {m: m.training for m in model.modules()}
    model.train()
    batch_stats = {m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training}
    state = {"kept": 0.0, "held": [], "peak": 0.0, "bn_extra": 0.0, "skip": set()}
    names = {m: n for n, m in model.named_modules()}

    def layer_hook(m, args, out):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not isinstance(out, torch.Tensor) or m in state["skip"]:
            return
        nx, ny = x.numel(), out.numel()
        grad_in = x.requires_grad
        act_grad = grad_in or masks == "always"
        kept = tmp = extra = 0.0
        rule = getattr(m, "analytic_rule", None)  # a module's own (kept, transient) rule
        if callable(rule):
            kept, tmp = rule(args, out)
        else:
            ctx = RuleContext(grad_in=grad_in, act_grad=act_grad, masks=masks, batch_stats=batch_stats)
            for claims, op_rule in RULES:  # the op's own rule (repnet.memory.ops)
                if claims(m):
                    kept, tmp, extra = op_rule(m, x, out, ctx)
                    break
        held = float(sum(state["held"]))
        running = tmp + state["kept"] + held
        if running > state["peak"]:
            state["peak"] = running
            rep.peak_layer = names.get(m, "")
        state["kept"] += kept
        state["bn_extra"] += extra
        ntrain = sum(q.numel() for q in m.parameters(recurse=False) if q.requires_grad)
        rep.rows.append(LayerRow(names.get(m, ""), type(m).__name__, nx, ny, kept, tmp, ntrain, extra, held, running))

    def block_pre(m, args):
        state["held"].append(float(ACT_BYTES * args[0].numel()))

    def block_post(m, args, out):
        state["held"].pop()

    residual = _residual_blocks(model, image_size)  # may run a probe forward: before any hook
    handles = []
    try:
        for m in model.modules():
            if _counted(m):
                handles.append(m.register_forward_hook(layer_hook))
        for b in residual:
            handles.append(b.register_forward_pre_hook(block_pre))
            # runs after the hooks already on the block (e.g. a method's side branch),
            # which still see the block input alive
            handles.append(b.register_forward_hook(block_post))
        model.eval()
        with torch.enable_grad():
            prelude = getattr(model, "analytic_prelude", None)
            if order == "paper" and callable(prelude):
                ran = prelude(inputs)  # counted now, before the backbone's first layer
                state["skip"] = {m for mod in ran for m in mod.modules()}  # not again in the forward
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    rep.peak_activation_bytes = state["peak"]
    rep.kept_bytes = state["kept"]
    rep.frozen_bn_extra_bytes = state["bn_extra"]
    return rep


def format_breakdown(rep: AnalyticReport, batch: int = 1, top: int | None = None) -> str:
    """A per-layer table (bytes scaled to ``batch``, in MB), then the totals."""
    rows = rep.rows
    if top is not None:
        rows = sorted(rows, key=lambda r: -(r.kept_bytes + r.frozen_bn_extra_bytes))[:top]
    s = batch / 1e6
    hdr = f"{'layer':<52} {'type':<16} {'|x|':>9} {'|y|':>9} {'kept MB':>9} {'tmp MB':>9} {'run MB':>9} {'train':>8}"
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        flag = " *bn" if r.frozen_bn_extra_bytes else ""
        out.append(f"{r.name[-52:]:<52} {r.type[:16]:<16} {r.in_numel:>9,d} {r.out_numel:>9,d} "
                   f"{r.kept_bytes * s:>9.3f} {r.transient_bytes * s:>9.3f} {r.running_bytes * s:>9.3f} "
                   f"{r.trainable_params:>8,d}{flag}")
    out.append("-" * len(hdr))
    out.append(f"batch {batch}: peak activation {rep.peak_activation_bytes * s:.2f} MB (at {rep.peak_layer}), "
               f"kept for backward {rep.saved_mb(batch):.2f} MB, params {rep.param_bytes / 1e6:.2f} MB "
               f"({rep.trainable_params:,d} trainable of {rep.total_params:,d}) -> total {rep.total_mb(batch):.2f} MB")
    if rep.frozen_bn_extra_bytes:
        out.append(f"not in the papers' count: frozen-scale norms with batch statistics keep their input "
                   f"(*bn): +{rep.frozen_bn_extra_mb(batch):.2f} MB")
    return "\n".join(out)
