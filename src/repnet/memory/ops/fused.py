"""A frozen inverted-residual core - [1x1 expansion ->] depthwise -> 1x1 projection - run channel
slice by channel slice: the wide maps are never whole.

Each wide channel feeds exactly one depthwise channel and the projection is a sum over channels, so
the core runs ``k`` channel slices at a time (expand, normalise, activate, filter, normalise,
activate, add the slice's projection into the output), forward and backward, with the ReLU masks and
frozen weights as all the backward needs. :func:`mark_fusable` (from ``apply_engine``) finds the cores;
each call runs fused only when every conv is frozen and bias-free, the norms use eval statistics and
no hook is registered, and ``k`` keeps a slice at most a quarter of the core's input or output and at
least ``MIN_SLICE_BYTES``. Why and where: docs/memory.md, "Fused inverted-residual cores".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from repnet.memory.ops.activations import MemHardtanh, MemReLU, MemReLU6
from repnet.memory.ops.base import engine_off, wants_grad
from repnet.memory.ops.conv import FUSED, MemConv2d, numeric_padding, conv2d_input_grad
from repnet.memory.ops.masks import apply_mask, pack_mask
from repnet.memory.ops.norm import per_channel, frozen_bn_scale

FUSED_WITH = "_fused_with"  # on the core's first unit: (depthwise unit or None, projection conv)
SLICE_SHARE = 4  # a slice of the widest map is at most 1/SLICE_SHARE of the core's input or output
#: ... but no smaller than this (bytes): slicing small maps only costs time (a Python loop of small
#: kernels) while the step's peak lies at the large, early ones
MIN_SLICE_BYTES = 2_000_000


def _unit(m: nn.Module):
    """``(conv, norm, act)`` of a Sequential of exactly those three engine layers, else None."""
    kids = list(m.children()) if isinstance(m, nn.Sequential) else []
    if len(kids) != 3:
        return None
    conv, norm, act = kids
    ok = (isinstance(conv, MemConv2d) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
          and isinstance(act, (MemReLU, MemReLU6, MemHardtanh)))
    return (conv, norm, act) if ok else None


def _pointwise(c: nn.Module) -> bool:
    return isinstance(c, MemConv2d) and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1


def _depthwise(c: nn.Module, channels: int | None = None) -> bool:
    return isinstance(c, MemConv2d) and c.groups == c.in_channels == c.out_channels and (
        channels is None or c.in_channels == channels)


def _projection(m: nn.Module | None, channels: int):
    """The 1x1 conv reading ``channels``: ``m`` itself, or the first layer of the Sequential ``m``."""
    if isinstance(m, nn.Sequential) and len(m):
        m = m[0]
    return m if _pointwise(m) and m.in_channels == channels else None


def _bounds(act: nn.Module):
    if getattr(act, "step_backward", False):
        return None
    if isinstance(act, MemReLU):
        return 0.0, float("inf")
    return float(act.min_val), float(act.max_val)


def _hooked(*mods: nn.Module) -> bool:
    return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for mod in mods for m in mod.modules())


def _frozen(conv: MemConv2d) -> bool:
    return not conv._weight_trains() and conv.bias is None and numeric_padding(conv) is not None


def _plan(head: nn.Module, x: torch.Tensor):
    """The fused op's layers if this call may fuse (module doc), else None."""
    mid, proj = head.__dict__[FUSED_WITH]
    units = [u for u in (_unit(head), _unit(mid) if mid is not None else None) if u is not None]
    if (torch.is_autocast_enabled(x.device.type) or x.dim() != 4 or len(units) != 1 + (mid is not None)
            or _hooked(head, proj, *([mid] if mid is not None else []))):
        return None
    for conv, norm, act in units:
        if not _frozen(conv) or norm.training or norm.running_var is None or wants_grad(norm.weight) \
                or _bounds(act) is None:
            return None
    if not _frozen(proj):
        return None
    return [(c, n, _bounds(a)) for c, n, a in units], proj


def _affine_act(t: torch.Tensor, s, shift, lo, hi, keep: bool = True):
    """Eval-statistics norm (in place) then the activation's 1-bit mask (if a backward will come:
    ``keep``) and the activation (in place)."""
    t.mul_(per_channel(s, t)).add_(per_channel(shift, t))
    mask = pack_mask(t, lo, hi) if keep else (None, False)
    t.clamp_(lo, hi)
    return mask


def _rows(t: torch.Tensor) -> torch.Tensor:
    """An NHWC tensor as (pixels, channels) rows (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _nhwc_zeros(like: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=torch.channels_last).zero_()


class FusedInvertedCoreFn(torch.autograd.Function):
    """[expand -> norm -> act ->] depthwise -> norm -> act -> project, ``k`` channel slices at a time."""

    @staticmethod
    def forward(ctx, x, shift_e, shift_d, plan, k):
        units, proj = plan
        expand = len(units) == 2
        wparts, weights, scales, shifts = [], [], [], []
        for (conv, norm, _), shift in zip(units, (shift_e, shift_d)[-len(units):]):
            parts, dq = conv._frozen_weight()
            wparts.append(parts)
            weights.append(dq(*parts))
            s = frozen_bn_scale(norm.weight, norm.running_var, norm.eps)
            scales.append(s)
            shifts.append(-norm.running_mean * s + (0 if shift is None else shift))
        pparts, pdq = proj._frozen_weight()
        w3 = pdq(*pparts)
        dw = units[-1][0]
        conv_dw = (dw.stride, numeric_padding(dw), dw.dilation)
        C = weights[-1].shape[0]
        step = math.ceil(C / k)
        keep = any(ctx.needs_input_grad[:3])  # nothing needs a gradient (e.g. last-layer training): no masks
        out = rows = None
        slices, layouts, masks = [], [], []
        for c0 in range(0, C, step):
            sl = slice(c0, min(C, c0 + step))
            ms, cls = [], []
            if expand:
                e = F.conv2d(x, weights[0][sl])
                m, cl = _affine_act(e, scales[0][sl], shifts[0][sl], *units[0][2], keep)
                ms.append(m), cls.append(cl)
            else:
                e = x[:, sl]
            d = F.conv2d(e, weights[-1][sl], None, *conv_dw, sl.stop - sl.start)
            del e
            m, cl = _affine_act(d, scales[-1][sl], shifts[-1][sl], *units[-1][2], keep)
            ms.append(m), cls.append(cl)
            d = d.contiguous(memory_format=torch.channels_last)
            if out is None:
                out = _nhwc_zeros(d, (d.shape[0], w3.shape[0], *d.shape[2:]))
                rows = _rows(out)
            rows.addmm_(_rows(d), w3[:, sl].reshape(w3.shape[0], -1).t())  # the slice's projection
            del d
            slices.append(sl)
            layouts.append(cls)
            masks += [m for m in ms if m is not None]
        ctx.plan, ctx.slices, ctx.layouts, ctx.conv_dw, ctx.x_shape = plan, slices, layouts, conv_dw, x.shape
        ctx.nparts = [len(p) for p in wparts] + [len(pparts)]
        ctx.save_for_backward(*[t for p in wparts for t in p], *pparts, *masks)  # masks through autograd
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        units, proj = ctx.plan
        expand = len(units) == 2
        saved, i, weights = ctx.saved_tensors, 0, []
        for conv, n in zip([u[0] for u in units] + [proj], ctx.nparts):
            weights.append(conv._frozen_weight()[1](*saved[i:i + n]))
            i += n
        masks, w3 = saved[i:], weights.pop()
        scales = [frozen_bn_scale(n.weight, n.running_var, n.eps) for _, n, _ in units]
        need_x = ctx.needs_input_grad[0]
        need_shift = ctx.needs_input_grad[1:3][-len(units):]
        gx = _nhwc_zeros(g, ctx.x_shape) if need_x else None
        gshift = [g.new_zeros(w.shape[0]) if need else None for w, need in zip(weights, need_shift)]
        n, cout, ho, wo = g.shape
        nhwc = g.is_contiguous(memory_format=torch.channels_last)
        if not nhwc and not g.is_contiguous():
            g = g.contiguous()
        # the projection's input gradient, a slice at a time, from g as it lies (no copy of g):
        # NHWC: (pixels, Cout) @ (Cout, width); NCHW: (width, Cout) @ (n, Cout, pixels)
        g_rows = _rows(g) if nhwc else g.view(n, cout, ho * wo)
        per = len(units)
        for j, sl in enumerate(ctx.slices):
            ms, cls = masks[per * j: per * (j + 1)], ctx.layouts[j]
            width = sl.stop - sl.start
            w3s = w3[:, sl].reshape(cout, width)
            if nhwc:
                gd = (g_rows @ w3s).view(n, ho, wo, width).permute(0, 3, 1, 2)
            else:
                gd = torch.matmul(w3s.t(), g_rows).view(n, width, ho, wo)
            gd = apply_mask(gd, ms[-1], cls[-1], inplace=True)  # a new tensor: ours
            if need_shift[-1]:
                gshift[-1][sl] = gd.sum((0, 2, 3))
            if not (need_x or (expand and need_shift[0])):
                continue
            gd.mul_(per_channel(scales[-1][sl], gd))
            ge = conv2d_input_grad((n, width, *ctx.x_shape[2:]), weights[-1][sl], gd, *ctx.conv_dw, width)
            del gd
            if not expand:
                gx[:, sl] = ge
                continue
            ge = apply_mask(ge, ms[0], cls[0], inplace=True)
            if need_shift[0]:
                gshift[0][sl] = ge.sum((0, 2, 3))
            if need_x:
                ge.mul_(per_channel(scales[0][sl], ge))
                ge = ge.contiguous(memory_format=torch.channels_last)
                _rows(gx).addmm_(_rows(ge), weights[0][sl].reshape(width, -1))  # 1x1 input gradient
        shifts = [None, None]
        shifts[2 - len(units):] = gshift
        return gx, shifts[0], shifts[1], None, None


def _slices(x: torch.Tensor, plan) -> int:
    """Channel slices so that a slice of the widest map is at most 1/SLICE_SHARE of the core's input
    or output (sizes from the layers' shapes)."""
    units, proj = plan
    dw = units[-1][0]
    h, w = x.shape[-2:]
    pd = numeric_padding(dw)
    ho, wo = ((s + 2 * p - d * (q - 1) - 1) // t + 1
              for s, p, d, q, t in zip((h, w), pd, dw.dilation, dw.kernel_size, dw.stride))
    wide = dw.in_channels * max(h * w, ho * wo)
    ends = max(x.shape[1] * h * w, proj.out_channels * ho * wo)
    floor = math.ceil(wide * x.shape[0] * x.element_size() / MIN_SLICE_BYTES) if MIN_SLICE_BYTES else wide
    return min(dw.in_channels, floor, max(1, math.ceil(SLICE_SHARE * wide / ends)))


def _head_forward(self, x):
    plan = None if engine_off(x) else _plan(self, x)
    k = _slices(x, plan) if plan is not None else 1
    if k == 1:
        return self._fused_base.forward(self, x)
    mid, proj = self.__dict__[FUSED_WITH]
    units = plan[0]
    shifts = [u[1].bias for u in units]
    out = FusedInvertedCoreFn.apply(x, shifts[0] if len(units) == 2 else None, shifts[-1], plan, k)
    out.__dict__[FUSED] = [m for m in (mid, proj) if m is not None]  # they pass it through
    return out


def _pass_forward(self, x):
    skip = x.__dict__.get(FUSED)
    if skip and skip[0] is self:
        skip.pop(0)
        return x  # computed by the fused core before it
    return self._fused_base.forward(self, x)


_CLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, kind: str, forward) -> type:
    cls = _CLASSES.get((base, kind))
    if cls is None:
        name = f"Fused{kind}{base.__name__}"
        cls = type(name, (base,), {"forward": forward, "_fused_base": base, "__module__": __name__, "__qualname__": name,
                                   "__doc__": f"``{base.__name__}`` in a fused inverted-residual core "
                                              f"({kind.lower()}; repnet.memory.ops.fused)."})
        globals()[name] = cls  # importable by name: models stay picklable
        _CLASSES[(base, kind)] = cls
    return cls


def mark_fusable(model: nn.Module) -> int:
    """Mark every fusable inverted-residual core of ``model`` (module doc); returns how many.
    Idempotent: earlier marks are undone first."""
    unmark_fusable(model)
    n = 0
    for parent in model.modules():
        if not (isinstance(parent, nn.Sequential) or getattr(parent, "engine_chain", False)):
            continue
        kids = [m for m in parent.children() if m is not None]
        i = 0
        while i < len(kids):
            first = _unit(kids[i])
            core = None
            if first is not None and _pointwise(first[0]) and i + 2 < len(kids):
                mid = _unit(kids[i + 1])
                if mid is not None and _depthwise(mid[0], first[0].out_channels):
                    proj = _projection(kids[i + 2], mid[0].out_channels)
                    core = (kids[i + 1], proj, 3) if proj is not None else None
            elif first is not None and _depthwise(first[0]) and i + 1 < len(kids):
                proj = _projection(kids[i + 1], first[0].out_channels)
                core = (None, proj, 2) if proj is not None else None
            if core is None or FUSED_WITH in kids[i].__dict__:
                i += 1
                continue
            mid, proj, width = core
            kids[i].__class__ = _subclass(type(kids[i]), "Head", _head_forward)
            if mid is not None:
                mid.__class__ = _subclass(type(mid), "Pass", _pass_forward)
            kids[i].__dict__[FUSED_WITH] = (mid, proj)  # __dict__: not submodules
            n += 1
            i += width
    return n


def unmark_fusable(model: nn.Module) -> None:
    """Undo :func:`mark_fusable` (the plain classes back)."""
    back = {v: k for (k, _), v in _CLASSES.items()}
    for m in model.modules():
        m.__dict__.pop(FUSED_WITH, None)
        if type(m) in back:
            m.__class__ = back[type(m)]


def _sequential_types() -> list[type]:
    try:  # torchvision's conv-norm-activation units (MobileNetV2) are Sequentials too
        import torchvision.ops.misc  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    out, todo = [], [nn.Sequential]
    while todo:
        t = todo.pop()
        out.append(t)
        todo.extend(t.__subclasses__())
    return out


def __getattr__(name: str):
    """The fused classes by name, made on first use (a model pickled in one process - the RSS
    measurement's child - unpickles in another, where no core was marked yet)."""
    for kind, forward in (("Head", _head_forward), ("Pass", _pass_forward)):
        prefix = f"Fused{kind}"
        if name.startswith(prefix):
            for base in _sequential_types():
                if base.__name__ == name[len(prefix):] and not base.__name__.startswith("Fused"):
                    return _subclass(base, kind, forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
