"""INT8 training of the side network (docs/int8.md), after the Fan group's INT8 Rep-Net.

``enable_int8_training(model, weights=True, activations=True, errors=True, rounding="stochastic",
frozen="linear", head=True)``: the frozen backbone held as 8-bit codes, and every trainable conv /
linear of the side modules (and the head) trained with int8 x int8 MACs in forward, input gradient and
weight gradient - symmetric per-tensor scales, forward rounded to nearest, errors stochastically
rounded, straight-through gradients, exact integer sums emulated in float, inputs kept as int8 codes,
fp32 or int8 master weights. Every choice and its reason: docs/int8.md, "Every choice, and why".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from repnet.errors import RepnetError
from repnet.memory.ops.conv import numeric_padding, standardize, conv2d_input_grad
from repnet.memory.quant import SCHEMES, quantize_frozen_weights

try:
    from timm.layers import StdConv2d as _StdConv2d
except ImportError:  # pragma: no cover - timm is a dependency
    _StdConv2d = None

__all__ = ["Int8Config", "enable_int8_training", "disable_int8_training", "int8_layers", "quantize",
           "project_int8_weights", "attach_int8_master", "MASTERS", "pack_on_grid", "unpack_on_grid",
           "int8_mac", "Int8Conv2d", "Int8StdConv2d", "Int8Linear", "QMAX", "ROUNDINGS"]

QMAX = 127
ROUNDINGS = ("stochastic", "nearest")
MASTERS = ("fp32", "int8")
_EXACT_F32 = 2 ** 24  # every integer of magnitude <= 2^24 is a float32


@dataclass(frozen=True)
class Int8Config:
    """What is quantised (docs/int8.md gives the reasons)."""

    weights: bool = True  # trainable weights -> int8 in forward and backward MACs
    activations: bool = True  # inputs of the trainable layers -> int8 (kept for backward as int8)
    errors: bool = True  # grad_output of the trainable layers -> int8
    rounding: str = "stochastic"  # rounding of the errors (forward always rounds to nearest)
    frozen: str = "linear"  # 8-bit storage of the frozen backbone weights: linear | kmeans
    head: bool = True  # also INT8-train the classifier
    master: str = "fp32"  # fp32: float master weights; int8: weights kept on their int8 grid

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise RepnetError(f"int8 rounding={self.rounding!r} is not valid; choose from: {', '.join(ROUNDINGS)}")
        if self.master not in MASTERS:
            raise RepnetError(f"int8 master={self.master!r} is not valid; choose from: {', '.join(MASTERS)}")
        if self.frozen not in SCHEMES:
            raise RepnetError(f"int8 frozen={self.frozen!r} is not valid; choose from: {', '.join(SCHEMES)}")


# ----------------------------------------------------------------------------- quantiser
def quantize(t: torch.Tensor, rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: ``(codes, scale)`` with ``t ~ codes * scale``.

    ``codes`` are integers in [-127, 127] held in ``t``'s float dtype (ready for a MAC);
    ``scale = max|t| / 127`` (1 for an all-zero tensor), a 0-dim tensor of ``t``'s dtype.
    ``rounding``: ``nearest`` (ties to even) or ``stochastic`` (``floor(t / scale + u)``, unbiased).
    """
    t = t.detach()
    amax = t.abs().amax()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    v = t / scale
    if rounding == "nearest":
        q = v.round_()
    elif rounding == "stochastic":
        q = v.add_(torch.rand_like(v)).floor_()
    else:
        raise RepnetError(f"rounding={rounding!r} is not valid; choose from: {', '.join(ROUNDINGS)}")
    return q.clamp_(-QMAX, QMAX), scale


def exact_acc_dtype(out_dtype: torch.dtype, k: int) -> torch.dtype:
    """float32 where a sum of ``k`` int8 products is exact in it, else float64."""
    return torch.float32 if out_dtype == torch.float32 and k * QMAX * QMAX <= _EXACT_F32 else torch.float64


def int8_mac(op, a: torch.Tensor, sa: torch.Tensor | None, b: torch.Tensor, sb: torch.Tensor | None,
             k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``op(a, b)`` rescaled: an exact integer MAC of codes times ``sa * sb`` when both are codes.

    ``k`` is the number of products in each sum (it picks the exact accumulator dtype). A
    ``None`` scale means that operand is a plain float tensor (its quantisation is off): the
    other is dequantised and the op runs in ``out_dtype``.
    """
    if sa is not None and sb is not None:
        acc_dtype = exact_acc_dtype(out_dtype, k)
        acc = op(a.to(acc_dtype), b.to(acc_dtype))
        return acc.to(out_dtype) * (sa * sb).to(out_dtype)
    a = a if sa is None else a * sa
    b = b if sb is None else b * sb
    return op(a.to(out_dtype), b.to(out_dtype))


def _maybe(t: torch.Tensor, on: bool, rounding: str = "nearest"):
    return quantize(t, rounding) if on else (t.detach(), None)


def _codes(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """What is kept for backward: int8 codes when quantised, else the float tensor."""
    return q.to(torch.int8) if scale is not None else q


# ----------------------------------------------------------------------------- autograd functions
class _Int8Conv2dFn(torch.autograd.Function):
    """Conv2d with int8 weights / activations / errors; keeps the input's int8 codes."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg, ws_eps, stride, padding, dilation, groups):
        w = standardize(weight.detach(), ws_eps) if ws_eps is not None else weight.detach()
        wq, sw = _maybe(w, cfg.weights)
        xq, sx = _maybe(x, cfg.activations)
        conv = (stride, padding, dilation, groups)
        k = w.shape[1] * w.shape[2] * w.shape[3]
        y = int8_mac(lambda a, b: F.conv2d(a, b, None, *conv), xq, sx, wq, sw, k, x.dtype)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.cfg, ctx.ws_eps, ctx.conv, ctx.in_shape = cfg, ws_eps, conv, x.shape
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.sx = sx
        ctx.save_for_backward(_codes(xq, sx) if need_w else None, weight if (need_x or need_w) else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        cfg, conv = ctx.cfg, ctx.conv
        stride, padding, dilation, groups = conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_codes, weight = ctx.saved_tensors
        gq, sg = _maybe(g, cfg.errors, cfg.rounding)
        gx = gw = gb = None
        if need_x or need_w:
            with torch.enable_grad():
                wm = weight.detach().requires_grad_(need_w and ctx.ws_eps is not None)
                w = standardize(wm, ctx.ws_eps) if ctx.ws_eps is not None else wm
            cout, cin_g, kh, kw = w.shape
            if need_x:
                wq, sw = _maybe(w.detach(), cfg.weights)
                gx = int8_mac(lambda a, b: conv2d_input_grad(ctx.in_shape, b, a, *conv), gq, sg, wq, sw,
                              (cout // groups) * kh * kw, g.dtype)
            if need_w:
                k = g.shape[0] * g.shape[2] * g.shape[3]
                gws = int8_mac(lambda a, b: torch.nn.grad.conv2d_weight(a, w.shape, b, *conv),
                               x_codes, ctx.sx, gq, sg, k, g.dtype)
                gw = torch.autograd.grad(w, wm, gws)[0] if ctx.ws_eps is not None else gws
        if need_b:
            gb = gq.sum((0, 2, 3)) * sg if sg is not None else g.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None


class _Int8LinearFn(torch.autograd.Function):
    """Linear layer with int8 weights / activations / errors; keeps the input's int8 codes."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg):
        wq, sw = _maybe(weight, cfg.weights)
        xq, sx = _maybe(x, cfg.activations)
        y = int8_mac(F.linear, xq, sx, wq, sw, weight.shape[1], x.dtype)
        if bias is not None:
            y = y + bias
        ctx.cfg, ctx.sx = cfg, sx
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(_codes(xq, sx) if need_w else None, weight if need_x else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        cfg = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_codes, weight = ctx.saved_tensors
        gq, sg = _maybe(g, cfg.errors, cfg.rounding)
        gx = gw = gb = None
        if need_x:
            wq, sw = _maybe(weight, cfg.weights)
            gx = int8_mac(torch.matmul, gq, sg, wq, sw, weight.shape[0], g.dtype)
        g2 = gq.reshape(-1, gq.shape[-1])
        if need_w:
            x2 = x_codes.reshape(-1, x_codes.shape[-1])
            gw = int8_mac(lambda a, b: a.t().matmul(b), g2, sg, x2, ctx.sx, g2.shape[0], g.dtype)
        if need_b:
            gb = g2.sum(0) * sg if sg is not None else g2.sum(0)
        return gx, gw, gb, None


# ----------------------------------------------------------------------------- modules
class _Int8Mixin:
    _int8: Int8Config

    def _int8_conv(self, x, ws_eps):
        pad = numeric_padding(self)
        if pad is None:
            raise RepnetError(f"int8 training supports zero, numeric padding only, not {self.padding!r}")
        return _Int8Conv2dFn.apply(x, self.weight, self.bias, self._int8, ws_eps, tuple(self.stride), pad,
                                   tuple(self.dilation), self.groups)


class Int8Conv2d(_Int8Mixin, nn.Conv2d):
    """``nn.Conv2d`` trained with int8 weights, activations and errors."""

    def forward(self, x):
        return self._int8_conv(x, None)


class Int8Linear(_Int8Mixin, nn.Linear):
    """``nn.Linear`` trained with int8 weights, activations and errors."""

    def forward(self, x):
        return _Int8LinearFn.apply(x, self.weight, self.bias, self._int8)


if _StdConv2d is not None:
    class Int8StdConv2d(_Int8Mixin, _StdConv2d):
        """timm ``StdConv2d`` (weight standardisation, Rep-Net's convs) with int8 MACs."""

        def forward(self, x):
            return self._int8_conv(x, self.eps)
else:  # pragma: no cover
    Int8StdConv2d = None

_INT8_TYPES = tuple(t for t in (Int8Conv2d, Int8StdConv2d, Int8Linear) if t is not None)


def _int8_class(m: nn.Module) -> type | None:
    if _StdConv2d is not None and isinstance(m, _StdConv2d):
        plain = all(not hasattr(m, a) for a in ("gain", "scale"))  # ScaledStdConv2d differs
        return Int8StdConv2d if plain else None
    if isinstance(m, nn.Conv2d):
        return Int8Conv2d if not isinstance(m, nn.ConvTranspose2d) else None
    if isinstance(m, nn.Linear):
        return Int8Linear
    return None


def int8_layers(model: nn.Module) -> list[nn.Module]:
    """The INT8-trained layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, _INT8_TYPES)]


# ----------------------------------------------------------------------------- storage
_CODES, _SCALE = ".int8_codes", ".int8_scale"


def pack_on_grid(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (keys relative to ``model``) for storage: in int8-master mode every INT8-trained
    weight becomes ``<key>.int8_codes`` (int8) + ``<key>.int8_scale`` where that reproduces it
    exactly (it lies on its grid), 1 byte per weight; anything else is left as it is."""
    cfg = getattr(model, "int8_config", None)
    if not cfg or cfg.get("master") != "int8":
        return state
    keys = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, _INT8_TYPES)}
    out = {}
    for k, v in state.items():
        if k in keys and v.is_floating_point() and v.numel():
            scale = v.abs().amax() / QMAX
            codes = torch.round(v / scale) if scale > 0 else v
            if scale > 0 and codes.abs().max() <= QMAX and torch.equal(codes * scale, v):
                out[k + _CODES] = codes.to(torch.int8)
                out[k + _SCALE] = scale.reshape(1).to(v.dtype)
                continue
        out[k] = v
    return out


def unpack_on_grid(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_on_grid` (a no-op on a state without int8 codes)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(_CODES):
            base = k[: -len(_CODES)]
            scale = tensors[base + _SCALE]
            out[base] = v.to(scale.dtype) * scale
        elif not k.endswith(_SCALE):
            out[k] = v
    return out


# ----------------------------------------------------------------------------- entry points
def enable_int8_training(model: nn.Module, weights: bool = True, activations: bool = True, errors: bool = True,
                         rounding: str = "stochastic", frozen: str = "linear", head: bool = True,
                         master: str = "fp32") -> nn.Module:
    """INT8 training of a side-network model (in place; returns ``model``).

    Stores the frozen backbone's conv / linear weights in 8 bits (``frozen`` scheme) and makes
    every trainable conv / linear layer of the side modules (and the head when ``head``)
    compute forward, input gradient and weight gradient as int8 MACs (docs/int8.md).
    The backbone must be frozen: a method that trains backbone weights is refused.
    """
    cfg = Int8Config(bool(weights), bool(activations), bool(errors), rounding, frozen, bool(head), master)
    backbone = getattr(model, "backbone", None)
    side_modules = getattr(model, "side_modules", None)
    if backbone is None or side_modules is None:
        raise RepnetError("int8 training needs a repnet TransferModel (a frozen backbone with side modules)")
    if getattr(model, "int8_config", None) is not None:
        raise RepnetError("int8 training is already enabled on this model")
    trained = [n for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad]
    if trained:
        raise RepnetError(f"int8 training needs a frozen backbone, but method '{getattr(model, 'method', '?')}' "
                          f"trains backbone weights (e.g. {trained[0]})")
    quantize_frozen_weights(model, frozen)
    targets = [*side_modules(), model.head] if cfg.head else list(side_modules())
    swapped = 0
    for mod in targets:
        for name, m in mod.named_modules():
            w = getattr(m, "weight", None)
            if not (isinstance(w, nn.Parameter) and w.requires_grad) or not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            new = _int8_class(m)
            if new is None:
                raise RepnetError(f"int8 training does not support layer {type(m).__name__} ({name})")
            m._int8_orig_class = type(m)
            m.__class__ = new
            m._int8 = cfg
            swapped += 1
    if not swapped:
        raise RepnetError(f"method '{getattr(model, 'method', '?')}' has no trainable conv / linear layer to train in int8")
    model.int8_config = dataclasses.asdict(cfg)
    if cfg.master == "int8":
        project_int8_weights(model, "nearest")  # start on the grid
    return model


def project_int8_weights(model: nn.Module, rounding: str = "stochastic") -> int:
    """Put every INT8-trained weight on its int8 grid (``codes * scale``); returns how many weights."""
    n = 0
    with torch.no_grad():
        for m in int8_layers(model):
            q, scale = quantize(m.weight, rounding)
            m.weight.copy_(q * scale)
            n += m.weight.numel()
    return n


def attach_int8_master(model: nn.Module, optimizer: torch.optim.Optimizer):
    """For ``master="int8"``: re-project the weights after every ``optimizer.step()``.

    Returns the hook handle, or ``None`` when the model is not in int8-master mode.
    """
    cfg = getattr(model, "int8_config", None)
    if not cfg or cfg.get("master", "fp32") != "int8":
        return None
    rounding = cfg["rounding"]
    return optimizer.register_step_post_hook(lambda *_: project_int8_weights(model, rounding))


def disable_int8_training(model: nn.Module) -> nn.Module:
    """Back to float training of the side layers (frozen weights stay 8-bit); returns ``model``."""
    for m in int8_layers(model):
        m.__class__ = m.__dict__.pop("_int8_orig_class")
        del m._int8
    if "int8_config" in model.__dict__:
        del model.int8_config
    return model
