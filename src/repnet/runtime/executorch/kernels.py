"""repnet's own ExecuTorch kernels: operators, export-time schemas, graph passes, the library loader.

ExecuTorch's convolution kernels are portable reference loops (no vectorisation, no threads), and
they run ~90 % of a frozen-backbone training program's time; the elementwise ops around them
(dequantising 8-bit weights, batch norm, ReLU6, packing and unpacking 1-bit masks) most of the
rest. ``device/kernels`` (C++, built into ``build/device/kernels/librepnet_kernels.so``) has
kernels of our own for them, in the ``repnet::`` operator namespace, registered with the runtime's
operator registry (in ``libexecutorch.so``, shared by the Python bindings and the C++ trainer):

``repnet::conv2d``
    convolution (1x1 pointwise and full convs: tiled GEMM, Eigen; depthwise: direct vectorised
    loops) reading int8 frozen weights + a scale per output channel directly (no float copy of
    the weight), with an optional fused eval-mode batch norm and clamp (ReLU / ReLU6);
``repnet::conv2d_input_grad``
    the input gradient of a convolution (a transposed convolution of the output gradient), int8
    weights read directly, with the frozen batch norm's backward scale folded into the weights and
    the next activation's 1-bit mask applied to the result;
``repnet::conv2d_weight_grad``
    the weight gradient of a trained convolution (Rep-Net's modules);
``repnet::conv2d_mask``
    ``conv2d`` that also writes its result's 1-bit mask (a ReLU6's) in the epilogue;
``repnet::mask_outside`` / ``repnet::mask_fill``
    a ReLU / ReLU6's 1-bit mask made in one pass (``(x <= lo) | (x >= hi)``, 8 per byte: the
    layout of :func:`repnet.runtime.executorch.passes.pack_masks`) and its backward (``where``);
``repnet::channel_sum``
    a bias gradient (sum over N, H, W);
``repnet::resize_bilinear`` / ``repnet::resize_bilinear_backward``
    ``F.interpolate(mode="bilinear")`` and its backward (Rep-Net's modules), traced as such while
    the model is exported (:func:`export_substitutions`).

Each op has a functional schema and an out variant (``torch.library``: what ``torch.export``,
``to_edge`` and ExecuTorch's memory planning read), a reference implementation in PyTorch (eager
checks) and a fake kernel. The passes below (:data:`KERNEL_PASSES`, one per rewrite) move the
joint graph onto them after :data:`repnet.runtime.executorch.passes.PASSES` and before memory planning,
so the planner plans every tensor of the rewritten graph; :func:`load_kernels` loads the library
into the process before a program that uses them runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import operator
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from repnet.errors import RepnetError

__all__ = ["KERNEL_PASSES", "run_kernel_passes", "load_kernels", "library_path", "kernel_ops", "set_runtime_threads",
           "export_substitutions", "NO_BOUND", "LIBRARY_ENV", "pack_bits", "unpack_bits", "kernel_avg_pool",
           "kernel_conv", "kernel_bn_act", "kernel_masks", "kernel_conv_mask", "kernel_grad_scale", "kernel_sums"]

aten = torch.ops.aten

#: a clamp / comparison bound that is not there (finite: a program stores its scalars as doubles)
NO_BOUND = 3.4028234663852886e38  # FLT_MAX

#: environment variable naming the shared library (default: build/device/kernels/librepnet_kernels.so)
LIBRARY_ENV = "REPNET_KERNELS_LIB"

# ----------------------------------------------------------------------------- schemas
_SCHEMAS = {
    "conv2d": "conv2d(Tensor input, Tensor weight, Tensor? weight_scale, Tensor? bias, int[] stride, int[] padding, "
              "int[] dilation, int groups, Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, Tensor? bn_var, "
              "float bn_eps, float act_min, float act_max)",
    "conv2d_input_grad": "conv2d_input_grad(Tensor grad_output, Tensor weight, Tensor? weight_scale, "
                         "Tensor? grad_scale, Tensor? mask, int[] input_size, int[] stride, int[] padding, "
                         "int[] dilation, int groups)",
    "conv2d_weight_grad": "conv2d_weight_grad(Tensor grad_output, Tensor input, int[] weight_size, int[] stride, "
                          "int[] padding, int[] dilation, int groups)",
    "mask_outside": "mask_outside(Tensor input, float lo, float hi)",
    "mask_fill": "mask_fill(Tensor input, Tensor mask, float value)",
    "channel_sum": "channel_sum(Tensor input)",
    "resize_bilinear": "resize_bilinear(Tensor input, int[] size, bool align_corners)",
    "resize_bilinear_backward": "resize_bilinear_backward(Tensor grad_output, int[] input_size, bool align_corners)",
}

_LIB = torch.library.Library("repnet", "DEF")  # noqa: TOR901 - the namespace is ours


def _bits(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (numel % 8 == 0) -> uint8 codes: bit i of byte j is element 8j + i of the flat tensor."""
    return (mask.reshape(-1, 8).to(torch.uint8) * _bits(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(codes: torch.Tensor, shape) -> torch.Tensor:
    return (codes.reshape(-1, 1) & _bits(codes.device)).ne(0).reshape(shape)


def _weight(weight, scale, extra=None):
    w = weight.to(torch.float32) * scale.reshape(-1, 1, 1, 1) if scale is not None else weight
    return w * extra.reshape(-1, 1, 1, 1) if extra is not None else w


def _clamp(y, lo, hi):
    lo = lo if lo > -NO_BOUND else None
    hi = hi if hi < NO_BOUND else None
    return y if lo is None and hi is None else y.clamp(lo, hi)


def _conv2d(input, weight, weight_scale, bias, stride, padding, dilation, groups, bn_weight, bn_bias, bn_mean, bn_var,
            bn_eps, act_min, act_max):
    y = F.conv2d(input, _weight(weight, weight_scale), bias, stride, padding, dilation, groups)
    if bn_mean is not None:
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, bn_eps)
    return _clamp(y, act_min, act_max)


def _conv2d_input_grad(grad_output, weight, weight_scale, grad_scale, mask, input_size, stride, padding, dilation,
                       groups):
    w = _weight(weight, weight_scale, grad_scale)
    gx = torch.nn.grad.conv2d_input(list(input_size), w, grad_output, stride, padding, dilation, groups)
    return gx.masked_fill(unpack_bits(mask, gx.shape), 0.0) if mask is not None else gx


def _conv2d_weight_grad(grad_output, input, weight_size, stride, padding, dilation, groups):
    return torch.nn.grad.conv2d_weight(input, list(weight_size), grad_output, stride, padding, dilation, groups)


def _mask_outside(input, lo, hi):
    m = torch.zeros_like(input, dtype=torch.bool)
    if lo > -NO_BOUND:
        m = m | (input <= lo)
    if hi < NO_BOUND:
        m = m | (input >= hi)
    return pack_bits(m)


def _mask_fill(input, mask, value):
    return input.masked_fill(unpack_bits(mask, input.shape), value)


def _channel_sum(input):
    return input.sum([d for d in range(input.dim()) if d != 1])


def _resize_bilinear(input, size, align_corners):
    return aten.upsample_bilinear2d.default(input, list(size), align_corners)


def _resize_bilinear_backward(grad_output, input_size, align_corners):
    return aten.upsample_bilinear2d_backward.default(grad_output, list(grad_output.shape[2:]), list(input_size),
                                                     align_corners)


_REFERENCE = {"conv2d": _conv2d, "conv2d_input_grad": _conv2d_input_grad, "conv2d_weight_grad": _conv2d_weight_grad,
              "mask_outside": _mask_outside, "mask_fill": _mask_fill, "channel_sum": _channel_sum,
              "resize_bilinear": _resize_bilinear, "resize_bilinear_backward": _resize_bilinear_backward}


def _define(name: str, schema: str, ref):
    _LIB.define(schema + " -> Tensor")
    _LIB.define(schema.replace(f"{name}(", f"{name}.out(", 1)[:-1] + ", *, Tensor(a!) out) -> Tensor(a!)")

    def functional(*args):
        return ref(*args).contiguous()

    def out_variant(*args, out):
        res = ref(*args)
        out.resize_(res.shape)
        out.copy_(res)
        return out

    def out_fake(*args, out):
        return out

    _LIB.impl(name, functional, "CompositeExplicitAutograd")
    _LIB.impl(f"{name}.out", out_variant, "CompositeExplicitAutograd")
    torch.library.register_fake(f"repnet::{name}", functional, lib=_LIB)
    torch.library.register_fake(f"repnet::{name}.out", out_fake, lib=_LIB)


for _name, _schema in _SCHEMAS.items():
    _define(_name, _schema, _REFERENCE[_name])


def _conv2d_mask(*args):
    y = _conv2d(*args[:-2]).contiguous()
    return y, _mask_outside(y, *args[-2:])


# conv2d with its result's 1-bit mask made in the epilogue (two outputs): kernel_conv_mask
_CONV2D_MASK = _SCHEMAS["conv2d"].replace("conv2d(", "conv2d_mask(", 1)[:-1] + ", float mask_lo, float mask_hi"
_LIB.define(_CONV2D_MASK + ") -> (Tensor, Tensor)")
_LIB.define(_CONV2D_MASK.replace("conv2d_mask(", "conv2d_mask.out(", 1)
            + ", *, Tensor(a!) out, Tensor(b!) mask) -> (Tensor(a!), Tensor(b!))")


def _conv2d_mask_out(*args, out, mask):
    y, m = _conv2d_mask(*args)
    out.resize_(y.shape).copy_(y)
    mask.resize_(m.shape).copy_(m)
    return out, mask


_LIB.impl("conv2d_mask", _conv2d_mask, "CompositeExplicitAutograd")
_LIB.impl("conv2d_mask.out", _conv2d_mask_out, "CompositeExplicitAutograd")
torch.library.register_fake("repnet::conv2d_mask", _conv2d_mask, lib=_LIB)
torch.library.register_fake("repnet::conv2d_mask.out", lambda *args, out, mask: (out, mask), lib=_LIB)
_REFERENCE["conv2d_mask"] = _conv2d_mask

ops = torch.ops.repnet


def _resize_setup(ctx, inputs, output):
    ctx.input_size, ctx.align_corners = list(inputs[0].shape), bool(inputs[2])


def _resize_grad(ctx, grad):
    return ops.resize_bilinear_backward(grad.contiguous(), ctx.input_size, ctx.align_corners), None, None


# a bilinear resize traced through repnet::resize_bilinear (kernel_resize) differentiates into its backward op
torch.library.register_autograd("repnet::resize_bilinear", _resize_grad, setup_context=_resize_setup, lib=_LIB)


def kernel_ops() -> tuple[str, ...]:
    """The out-variant operator names a program calls when it uses our kernels."""
    return tuple(f"repnet::{n}.out" for n in _REFERENCE)


# ----------------------------------------------------------------------------- the shared library
def library_path() -> Path:
    """``$REPNET_KERNELS_LIB``, or ``build/device/kernels/librepnet_kernels.so`` of this checkout."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "build" / "device" / "kernels" / "librepnet_kernels.so"


_loaded: dict[str, int] = {}


def load_kernels() -> int:
    """Load the kernel library into this process (once) so that ExecuTorch's runtime finds the
    ``repnet::`` kernels; returns how many it registered. One-line :class:`RepnetError` when it is
    missing or does not register."""
    path = library_path()
    key = str(path)
    if key in _loaded:
        return _loaded[key]
    # the runtime (libexecutorch.so of the wheel, holding the operator registry) first, so that the
    # library binds to the same copy
    from executorch.extension.pybindings import portable_lib  # noqa: F401
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer  # noqa: F401

    if not path.is_file():
        raise RepnetError(f"this ExecuTorch program runs repnet's kernels, but {path} is not built: bash "
                          f"scripts/setup.sh builds it (or set {LIBRARY_ENV}; or export the portable program: "
                          "--portable / export_training_program(kernels=False))")
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise RepnetError(f"cannot load {path}: {str(e).splitlines()[0]} (rebuild it: bash scripts/setup.sh)") from None
    lib.repnet_kernels_register.restype = ctypes.c_int
    n = lib.repnet_kernels_register()
    if n <= 0:
        raise RepnetError(f"{path}: registering repnet's kernels with the ExecuTorch runtime failed (error {-n}); "
                          "was the library built against another executorch?")
    registered = set(portable_lib._get_operator_names())
    missing = [op for op in kernel_ops() if op not in registered]
    if missing:
        raise RepnetError(f"{path} loaded, but the runtime does not see {', '.join(missing)}: an older build, or one "
                          "against another executorch than the one installed (rebuild: bash scripts/setup.sh)")
    _loaded[key] = n
    return n


def set_runtime_threads(n: int) -> None:
    """Threads of ExecuTorch's thread pool (our kernels and its optimized ones run on it)."""
    from executorch.extension.pybindings import portable_lib

    if int(portable_lib._threadpool_get_thread_count()) != int(n):
        portable_lib._unsafe_reset_threadpool(int(n))


# ----------------------------------------------------------------------------- graph helpers
def _call(graph: torch.fx.Graph, op, *args, before: torch.fx.Node) -> torch.fx.Node:
    """A new ``op(*args)`` node right before ``before``, with its fake-tensor metadata (made in the
    fake mode of its inputs, or of ``before``'s)."""
    with graph.inserting_before(before):
        node = graph.call_function(op, tuple(args))
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    known = [v for v in vals + [before.meta.get("val")] if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")]
    mode = known[0].fake_mode
    with mode:
        node.meta["val"] = op(*vals)
    return node


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _dequantised(node):
    """``(codes, scale)`` when ``node`` is an int8 weight dequantised per output channel
    (``codes.to(float) * scale.view(-1, 1, 1, 1)``, :class:`repnet.memory.quant.PlainQuantConv2d`)."""
    if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for cast, view in (node.args, node.args[::-1]):
        if not (_is(cast, aten._to_copy.default) and _is(view, aten.view.default)):
            continue
        codes, scale = cast.args[0], view.args[0]
        cv, sv = _val(codes), _val(scale)
        if (isinstance(cv, torch.Tensor) and isinstance(sv, torch.Tensor) and cv.dtype == torch.int8
                and cast.meta["val"].dtype == torch.float32 and sv.dtype == torch.float32 and sv.dim() == 1
                and cv.dim() == 4 and sv.shape[0] == cv.shape[0] and list(view.args[1]) == [-1, 1, 1, 1]
                and cast.kwargs.get("dtype") == torch.float32):
            return codes, scale
    return None


def _weight_args(weight):
    deq = _dequantised(weight)
    return deq if deq is not None else (weight, None)


def _float4d(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype == torch.float32


# ----------------------------------------------------------------------------- export-time substitutions
class _KernelExport(TorchFunctionMode):
    """While a model is traced for a program: ``F.interpolate(mode="bilinear", size=...)`` runs as
    ``repnet::resize_bilinear`` (whose backward is ``repnet::resize_bilinear_backward``), instead of
    the gathers and scatters (``index`` / ``index_put``) that export decomposes it into."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.interpolate:
            import inspect

            bound = inspect.signature(F.interpolate).bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x = a["input"]
            if (a["mode"] == "bilinear" and a["size"] is not None and a["scale_factor"] is None
                    and not a["antialias"] and isinstance(x, torch.Tensor) and x.dim() == 4
                    and x.dtype == torch.float32):
                size = list(a["size"]) if isinstance(a["size"], (list, tuple)) else [a["size"]] * 2
                self.count += 1
                return ops.resize_bilinear(x.contiguous(), [int(v) for v in size], bool(a["align_corners"]))
        return func(*args, **kwargs)


@contextlib.contextmanager
def export_substitutions(passes=None):
    """Context for tracing a model into a program that runs our kernels (``passes``: the kernel
    passes in use; the substitutions are ``kernel_resize``'s). Yields a dict that receives the
    number of substituted calls (``{"kernel_resize": n}``) when the block ends."""
    done: dict = {}
    if passes is not None and "kernel_resize" not in passes:
        yield done
        return
    mode = _KernelExport()
    with mode:
        yield done
    done["kernel_resize"] = mode.count


# ----------------------------------------------------------------------------- passes
def kernel_avg_pool(graph: torch.fx.Graph) -> int:
    """``avg_pool2d`` without padding (Rep-Net's modules pool their input, module 1 the image) as a
    depthwise ``repnet::conv2d`` with a constant ``1 / (kh * kw)`` kernel (its backward: the
    avg_pool pass's transposed convolution, then ``kernel_conv``)."""
    done = 0
    for node in list(graph.nodes):
        if not (_is(node, aten.avg_pool2d.default) and _float4d(node.args[0])):
            continue
        x, kernel, *rest = node.args
        stride = rest[0] if rest and rest[0] else kernel
        padding = rest[1] if len(rest) > 1 else [0, 0]
        ceil_mode = rest[2] if len(rest) > 2 else False
        divisor = rest[4] if len(rest) > 4 else None
        kernel = list(kernel) * (2 // len(kernel))
        stride = list(stride) * (2 // len(stride))
        padding = list(padding) * (2 // len(padding)) if padding else [0, 0]
        if any(padding) or ceil_mode or divisor is not None:
            continue
        c = _val(x).shape[1]
        w = _call(graph, aten.full.default, [c, 1, *kernel], 1.0 / (kernel[0] * kernel[1]), before=node)
        new = _call(graph, ops.conv2d.default, x, w, None, None, stride, [0, 0], [1, 1], c, None, None, None, None,
                    0.0, -NO_BOUND, NO_BOUND, before=node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def kernel_conv(graph: torch.fx.Graph) -> int:
    """Every 2-D convolution onto ``repnet::conv2d`` (forward), ``repnet::conv2d_input_grad`` (a
    transposed convolution: the frozen_conv / avg_pool passes' input gradients) and, for a trained
    convolution's ``convolution_backward``, ``conv2d_input_grad`` + ``conv2d_weight_grad`` +
    ``channel_sum``; an 8-bit weight dequantised in the graph is read as its codes and scales."""
    done = 0
    for node in list(graph.nodes):
        if _is(node, aten.convolution.default):
            x, w, b, stride, padding, dilation, transposed, out_pad, groups = node.args
            if not (_float4d(x) and _float4d(w) and _float4d(node)):
                continue
            weight, scale = _weight_args(w)
            if not transposed:
                new = _call(graph, ops.conv2d.default, x, weight, scale, b, list(stride), list(padding),
                            list(dilation), groups, None, None, None, None, 0.0, -NO_BOUND, NO_BOUND, before=node)
            else:
                if b is not None or any(d * (k - 1) - p < 0 for d, k, p in
                                        zip(dilation, _val(w).shape[2:], padding)):
                    continue
                new = _call(graph, ops.conv2d_input_grad.default, x, weight, scale, None, None,
                            list(_val(node).shape), list(stride), list(padding), list(dilation), groups, before=node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            done += 1
        elif _is(node, aten.convolution_backward.default):
            grad, x, w, _bias_sizes, stride, padding, dilation, transposed, _opad, groups, mask = node.args
            if transposed or not (_float4d(grad) and _float4d(x) and _float4d(w)):
                continue
            if any(d * (k - 1) - p < 0 for d, k, p in zip(dilation, _val(w).shape[2:], padding)):
                continue
            weight, scale = _weight_args(w)
            users = {u.args[1]: u for u in node.users if u.target is operator.getitem}
            new = {}
            if mask[0] and 0 in users:
                new[0] = _call(graph, ops.conv2d_input_grad.default, grad, weight, scale, None, None,
                               list(_val(x).shape), list(stride), list(padding), list(dilation), groups, before=node)
            if mask[1] and 1 in users:
                new[1] = _call(graph, ops.conv2d_weight_grad.default, grad, x, list(_val(w).shape), list(stride),
                               list(padding), list(dilation), groups, before=node)
            if mask[2] and 2 in users:
                new[2] = _call(graph, ops.channel_sum.default, grad, before=node)
            for i, user in users.items():
                if i in new:
                    user.replace_all_uses_with(new[i])
                    graph.erase_node(user)
            if not node.users:
                graph.erase_node(node)
            done += 1
    return done


def kernel_bn_act(graph: torch.fx.Graph) -> int:
    """A ``repnet::conv2d`` followed by an eval-mode batch norm (its only reader) takes the norm
    into its epilogue, and then a ReLU6 / ReLU / hardtanh after it. The activation's mask
    comparisons (``le(x, lo)``, ``ge(x, hi)``, moved to the forward by activation_mask) then read
    the clamped output: ``x <= lo`` iff ``clamp(x, lo, hi) <= lo`` (and likewise ``hi``)."""
    done = 0
    for node in list(graph.nodes):
        if not _is(node, ops.conv2d.default) or len(node.users) != 1:
            continue
        args = list(node.args)
        bn = next(iter(node.users))
        if (args[10] is None and _is(bn, aten._native_batch_norm_legit_no_training.default)
                and bn.args[0] is node):
            outs = [u for u in bn.users if u.target is operator.getitem]
            if len(outs) != len(bn.users) or any(u.args[1] != 0 for u in outs):
                continue
            _x, bw, bb, mean, var, _momentum, eps = bn.args
            args[8:13] = [bw, bb, mean, var, float(eps)]
            fused = _call(graph, ops.conv2d.default, *args, before=bn)
            for u in outs:
                u.replace_all_uses_with(fused)
                graph.erase_node(u)
            graph.erase_node(bn)
            graph.erase_node(node)
            node, done = fused, done + 1
        _fuse_activation(graph, node)
    return done


def _fuse_activation(graph: torch.fx.Graph, conv: torch.fx.Node) -> bool:
    args = list(conv.args)
    if args[13] > -NO_BOUND or args[14] < NO_BOUND:
        return False
    acts = [u for u in conv.users if _is(u, aten.hardtanh.default, aten.relu.default, aten.clamp.default)]
    if len(acts) != 1:
        return False
    act = acts[0]
    if act.target is aten.relu.default:
        lo, hi = 0.0, NO_BOUND
    elif act.target is aten.hardtanh.default:
        lo = act.args[1] if len(act.args) > 1 else act.kwargs.get("min_val", -1.0)
        hi = act.args[2] if len(act.args) > 2 else act.kwargs.get("max_val", 1.0)
        lo, hi = float(lo), float(hi)
    else:
        lo = act.args[1] if len(act.args) > 1 and act.args[1] is not None else -NO_BOUND
        hi = act.args[2] if len(act.args) > 2 and act.args[2] is not None else NO_BOUND
        lo, hi = float(lo), float(hi)
    if not lo < hi:
        return False
    # every other reader compares with a bound: the same answer on the clamped output
    for u in conv.users:
        if u is act:
            continue
        ok = (_is(u, aten.le.Scalar) and u.args[0] is conv and float(u.args[1]) == lo) or \
             (_is(u, aten.ge.Scalar) and u.args[0] is conv and float(u.args[1]) == hi)
        if not ok:
            return False
    args[13:15] = [lo, hi]
    fused = _call(graph, ops.conv2d.default, *args, before=conv)
    act.replace_all_uses_with(fused)
    graph.erase_node(act)
    conv.replace_all_uses_with(fused)
    graph.erase_node(conv)
    return True


def _compare(node):
    """``(x, lo, hi)`` of a ``le(x, lo)`` / ``ge(x, hi)`` comparison of a float tensor."""
    if _is(node, aten.le.Scalar) and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1]), NO_BOUND
    if _is(node, aten.ge.Scalar) and isinstance(node.args[1], (int, float)):
        return node.args[0], -NO_BOUND, float(node.args[1])
    return None


def _bit_values(node) -> bool:
    """``pow(full([8], 2), arange(0, 8))``: the pack_masks pass's bit values."""
    return (_is(node, aten.pow.Tensor_Tensor) and _is(node.args[0], aten.full.default)
            and list(node.args[0].args[0]) == [8] and node.args[0].args[1] == 2
            and _is(node.args[1], aten.arange.start_step) and tuple(node.args[1].args[:2]) == (0, 8))


def _packed(node):
    """``(x, lo, hi)`` when ``node`` is pack_masks' packing of a comparison (or the or of two packed
    comparisons of one tensor): uint8 codes of ``(x <= lo) | (x >= hi)``."""
    if _is(node, aten.bitwise_or.Tensor):  # a ReLU6's two packed comparisons: le(x, lo) | ge(x, hi)
        a, b = (_packed(n) for n in node.args)
        if a and b and a[0] is b[0]:
            le, ge = (a, b) if a[2] == NO_BOUND else (b, a)
            if le[2] == NO_BOUND and ge[1] == -NO_BOUND and le[1] > -NO_BOUND and ge[2] < NO_BOUND:
                return a[0], le[1], ge[2]
        return None
    if not (_is(node, aten.sum.dim_IntList) and list(node.args[1]) == [1]):
        return None
    mul = node.args[0]
    if not (_is(mul, aten.mul.Tensor) and _bit_values(mul.args[1]) and _is(mul.args[0], aten.view.default)):
        return None
    cast = mul.args[0].args[0]
    if not (_is(cast, aten._to_copy.default) and list(mul.args[0].args[1]) == [-1, 8]):
        return None
    cmp = _compare(cast.args[0])
    if cmp is None or not isinstance(_val(cmp[0]), torch.Tensor) or _val(cmp[0]).dtype != torch.float32:
        return None
    return cmp


def _unpacked(node):
    """The uint8 codes that ``node`` (pack_masks' unpacking: ``view(ne(and(unsqueeze(codes, 1),
    bits), 0), shape)``) expands to a bool tensor, or None."""
    if not _is(node, aten.view.default):
        return None
    ne = node.args[0]
    if not (_is(ne, aten.ne.Scalar) and ne.args[1] == 0 and _is(ne.args[0], aten.bitwise_and.Tensor)):
        return None
    band = ne.args[0]
    if not (_is(band.args[0], aten.unsqueeze.default) and band.args[0].args[1] == 1 and _bit_values(band.args[1])):
        return None
    return band.args[0].args[0]


def _scalar(node):
    if _is(node, aten.scalar_tensor.default) and isinstance(node.args[0], (int, float)):
        return float(node.args[0])
    if _is(node, aten.full.default) and list(node.args[0]) == [] and isinstance(node.args[1], (int, float)):
        return float(node.args[1])
    return None


def kernel_masks(graph: torch.fx.Graph) -> int:
    """pack_masks' 1-bit masks onto ``repnet::mask_outside`` (one pass over the activation, no bool
    tensors) and their readers, ``where(mask, v, grad)``, onto ``repnet::mask_fill`` - or, when
    ``grad`` is a ``conv2d_input_grad`` read by nothing else and ``v`` is 0, into its epilogue."""
    done = 0
    for kind in (aten.bitwise_or.Tensor, aten.sum.dim_IntList):  # a ReLU6's or-ed pair first, as one mask
        for node in list(graph.nodes):
            packed = _packed(node) if _is(node, kind) else None
            if packed is None or _val(packed[0]).numel() % 8:
                continue
            new = _call(graph, ops.mask_outside.default, *packed, before=node)
            node.replace_all_uses_with(new)
            done += 1
        graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if not (_is(node, aten.where.self) and len(node.args) == 3):
            continue
        cond, fill, grad = node.args
        codes, value = _unpacked(cond), _scalar(fill)
        if codes is None or value is None or not (_val(grad) is not None and _val(grad).dtype == torch.float32):
            continue
        if tuple(_val(grad).shape) != tuple(_val(node).shape):
            continue
        if (value == 0.0 and _is(grad, ops.conv2d_input_grad.default) and len(grad.users) == 1
                and grad.args[4] is None):
            args = list(grad.args)
            args[4] = codes
            new = _call(graph, ops.conv2d_input_grad.default, *args, before=grad)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(grad)
        else:
            new = _call(graph, ops.mask_fill.default, grad, codes, value, before=node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        done += 1
    return done


def kernel_conv_mask(graph: torch.fx.Graph) -> int:
    """A ``mask_outside`` of a ``repnet::conv2d``'s result (a ReLU6's mask, after kernel_bn_act and
    kernel_masks) is made by the conv itself, in its epilogue (``repnet::conv2d_mask``): no second
    pass over the activation. Maps whose size is a multiple of 8 (each plane is whole bytes)."""
    done = 0
    for node in list(graph.nodes):
        if not _is(node, ops.mask_outside.default):
            continue
        y, lo, hi = node.args
        v = _val(y)
        if not (_is(y, ops.conv2d.default) and (v.shape[2] * v.shape[3]) % 8 == 0):
            continue
        fused = _call(graph, ops.conv2d_mask.default, *y.args, lo, hi, before=y)
        parts = []
        for i in range(2):
            with graph.inserting_after(parts[-1] if parts else fused):
                part = graph.call_function(operator.getitem, (fused, i))
            part.meta["val"] = fused.meta["val"][i]
            parts.append(part)
        y.replace_all_uses_with(parts[0])
        node.replace_all_uses_with(parts[1])
        graph.erase_node(node)
        graph.erase_node(y)
        done += 1
    return done


def _channel_vector(node, channels: int):
    """The [C] tensor that ``node`` ([1, C, 1, 1]: unsqueezes or a view of one) broadcasts, or None."""
    v = _val(node)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (1, channels, 1, 1) or v.dtype != torch.float32:
        return None
    src = node
    while _is(src, aten.unsqueeze.default, aten.view.default, aten.reshape.default):
        src = src.args[0]
        sv = _val(src)
        if isinstance(sv, torch.Tensor) and tuple(sv.shape) == (channels,):
            return src
    return None


def kernel_grad_scale(graph: torch.fx.Graph) -> int:
    """``conv2d_input_grad(g * a)`` with ``a`` a per-channel vector (a frozen batch norm's backward
    scale, ``gamma / sqrt(var + eps)``) and the product read by nothing else: ``a`` goes into the
    kernel's weights (``grad_scale``), the product is never made."""
    done = 0
    for node in list(graph.nodes):
        if not (_is(node, ops.conv2d_input_grad.default) and node.args[3] is None):
            continue
        mul = node.args[0]
        if not (_is(mul, aten.mul.Tensor) and len(mul.users) == 1 and _float4d(mul)):
            continue
        c = _val(mul).shape[1]
        for t, a in (mul.args, mul.args[::-1]):
            vec = _channel_vector(a, c) if isinstance(a, torch.fx.Node) else None
            if vec is not None and _float4d(t) and tuple(_val(t).shape) == tuple(_val(mul).shape):
                args = list(node.args)
                args[0], args[3] = t, vec
                new = _call(graph, ops.conv2d_input_grad.default, *args, before=node)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.erase_node(mul)
                done += 1
                break
    return done


def kernel_sums(graph: torch.fx.Graph) -> int:
    """``sum(x, [0, 2, 3])`` of an NCHW float tensor (bias gradients) onto ``repnet::channel_sum``."""
    done = 0
    for node in list(graph.nodes):
        if not (_is(node, aten.sum.dim_IntList) and _float4d(node.args[0])):
            continue
        dims = sorted(d % 4 for d in node.args[1])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims != [0, 2, 3] or keep or node.kwargs.get("dtype") not in (None, torch.float32):
            continue
        new = _call(graph, ops.channel_sum.default, node.args[0], before=node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


#: the rewrites onto our kernels, in the order they run (after passes.PASSES);
#: ``kernel_resize`` works while the model is traced (:func:`export_substitutions`)
KERNEL_PASSES = ("kernel_resize", "kernel_avg_pool", "kernel_conv", "kernel_bn_act", "kernel_masks",
                 "kernel_conv_mask", "kernel_grad_scale", "kernel_sums")

_STEPS = {"kernel_avg_pool": kernel_avg_pool, "kernel_conv": kernel_conv, "kernel_bn_act": kernel_bn_act,
          "kernel_masks": kernel_masks, "kernel_conv_mask": kernel_conv_mask, "kernel_grad_scale": kernel_grad_scale,
          "kernel_sums": kernel_sums}


def run_kernel_passes(ep, passes=KERNEL_PASSES) -> dict:
    """The kernel rewrites named in ``passes`` on ``ep``'s joint graph (in place); pass -> sites."""
    unknown = sorted(set(passes) - set(KERNEL_PASSES))
    if unknown:
        raise RepnetError(f"unknown kernel pass(es) {', '.join(unknown)}; choose from {', '.join(KERNEL_PASSES)}")
    graph = ep.graph_module.graph
    done = {}
    for name in KERNEL_PASSES:
        if name in passes and name in _STEPS:
            done[name] = _STEPS[name](graph)
            graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return done
