"""Graph passes that make an ExecuTorch training program keep what repnet's engine keeps.

``torch.export`` + ``_export_forward_backward`` re-derive the backward from the ATen graph, so
out of the box a program keeps what eager autograd keeps: a frozen convolution's input (for a
weight gradient never asked for), every ReLU6's input *copied*, masks as a byte per element, and
every elementwise op writes a fresh tensor. Two kinds of passes fix that.

On the joint forward + backward graph (ATen, before ``to_edge``):

``frozen_conv``
    ``convolution_backward`` of a conv whose weight does not train (``output_mask[1]`` false): the
    input gradient is a transposed convolution of the output gradient with the weight (and a
    bias gradient, if any, a sum of it), so the conv's forward input is no longer an input of the
    backward (:class:`repnet.memory.ops.conv` does the same in eager PyTorch).
``activation_mask``
    The backward of ReLU / ReLU6 / hardtanh reads its saved float tensor only through comparisons
    (``le(out, 0)``; ``le(in, 0) | ge(in, 6)``); those move into the forward, right after the
    tensor is made, so a mask is what lives until the backward.
``pack_masks``
    Each such mask is bit-packed right after its comparison (uint8 view ``[-1, 8]``, times
    ``1, 2, ..., 128``, summed: one bit per element; a ReLU6's two comparisons are packed one at a time
    and or-ed packed) and unpacked just before the backward reads it: the papers' 1-bit mask,
    with ops the portable kernels have (``bitwise_left_shift`` / ``right_shift`` / ``and``).
``avg_pool``
    ``avg_pool2d_backward`` has no ExecuTorch kernel: without padding it is a transposed
    convolution of the gradient with a constant ``1 / (kh * kw)`` kernel (exact).
``recompute_weights``
    What the forward computes from weights alone (an 8-bit frozen weight dequantised to float,
    :class:`repnet.memory.quant.PlainQuantConv2d`; a standardised conv weight) is computed again
    just before the backward reads it, so no float copy of a weight lives across the step.
``hoist_input_reductions``
    An op that reads only the image (and weights) and makes a smaller tensor - Rep-Net's module 1
    pools the image - runs first thing, so the image is not held until that module runs.

Frozen eval-mode batch norm needs no pass: in the joint graph its backward is already the fixed
scale ``weight / sqrt(running_var + eps)``.

In memory planning (:class:`InPlacePlanning`, on the out-variant graph that ``to_executorch``
plans): the output of an elementwise op (eval batch norm, ReLU6, adds, ``where``, casts between
1-byte types, ...) is placed in the storage of an input that dies at that op (ExecuTorch's
``TensorSpec.storage_base``), as eager PyTorch's in-place ops do; and besides ExecuTorch's own
greedy planner, :func:`offsets_by_size` (largest tensors first, each at the lowest free offset of
one arena) is tried, the smaller plan kept.
"""
from __future__ import annotations

import functools
import operator
from collections import defaultdict

import torch

from .errors import RepnetError

__all__ = ["frozen_conv", "activation_mask", "pack_masks", "avg_pool", "forward_end", "InPlacePlanning",
           "offsets_by_size", "recompute_weights", "hoist_input_reductions", "run_passes", "PASSES"]

aten = torch.ops.aten


def _fake(node, op, *args, like: torch.fx.Node | None = None):
    """Metadata (a fake tensor) for a new node, from its inputs' (or ``like``'s) fake tensors."""
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    mode = next(v.fake_mode for v in vals + ([like.meta["val"]] if like is not None else [])
                if isinstance(v, torch.Tensor))
    with mode:
        node.meta["val"] = op(*vals)


def _out_padding(in_shape, out_shape, weight_shape, stride, padding, dilation):
    return [int(in_shape[i + 2] - ((out_shape[i + 2] - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (weight_shape[i + 2] - 1) + 1)) for i in range(2)]


def _replace_getitems(node, values: dict[int, torch.fx.Node | None]):
    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] in values and values[user.args[1]] is not None:
            user.replace_all_uses_with(values[user.args[1]])


def frozen_conv(graph: torch.fx.Graph) -> int:
    n_done = 0
    for node in list(graph.nodes):
        if node.target is not aten.convolution_backward.default:
            continue
        grad, inp, weight, _bias_sizes, stride, padding, dilation, transposed, _opad, groups, mask = node.args
        if transposed or mask[1] or weight.meta["val"].dim() != 4:
            continue
        out_pad = _out_padding(inp.meta["val"].shape, grad.meta["val"].shape, weight.meta["val"].shape,
                               stride, padding, dilation)
        values: dict[int, torch.fx.Node | None] = {}
        with graph.inserting_before(node):
            if mask[0]:
                args = (grad, weight, None, stride, padding, dilation, True, out_pad, groups)
                gi = graph.call_function(aten.convolution.default, args)
                _fake(gi, aten.convolution.default, *args)
                values[0] = gi
            if mask[2]:
                gb = graph.call_function(aten.sum.dim_IntList, (grad, [0, 2, 3]))
                _fake(gb, aten.sum.dim_IntList, grad, [0, 2, 3])
                values[2] = gb
        _replace_getitems(node, values)
        n_done += 1
    return n_done


_COMPARE = {aten.le.Scalar, aten.ge.Scalar, aten.lt.Scalar, aten.gt.Scalar}
_COMBINE = {aten.bitwise_or.Tensor, aten.logical_or.default}


def _source(node: torch.fx.Node) -> torch.fx.Node:
    while node.target in (aten.alias.default, aten.clone.default) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def activation_mask(graph: torch.fx.Graph, forward_end: torch.fx.Node) -> int:
    """Move backward comparisons of forward tensors (and their or) up to where the tensor is made."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    moved = 0
    for node in list(graph.nodes):
        if order[node] <= order[forward_end] or node.target not in _COMPARE:
            continue
        if not isinstance(node.args[0], torch.fx.Node):
            continue
        src = _source(node.args[0])  # through aliases / the copy export saves: the forward tensor itself
        if order[src] > order[forward_end]:
            continue
        node.args = (src, *node.args[1:])
        src.append(node)  # right after the tensor it compares
        order = {n: i for i, n in enumerate(graph.nodes)}
        moved += 1
    for node in list(graph.nodes):
        if node.target in _COMBINE and all(isinstance(a, torch.fx.Node) and a.target in _COMPARE for a in node.args):
            last = max(node.args, key=lambda a: order[a])
            if order[last] < order[forward_end]:
                last.append(node)
                order = {n: i for i, n in enumerate(graph.nodes)}
    return moved


def avg_pool(graph: torch.fx.Graph) -> int:
    n_done = 0
    for node in list(graph.nodes):
        if node.target is not aten.avg_pool2d_backward.default:
            continue
        grad, inp, kernel, stride, padding, ceil_mode, _count_pad, divisor = node.args
        kernel = list(kernel) * (2 // len(kernel))
        stride = list(stride or kernel) * (2 // len(stride or kernel))
        padding = list(padding) * (2 // len(padding)) if padding else [0, 0]
        if any(padding) or ceil_mode or divisor is not None:
            raise RepnetError("ExecuTorch export: avg_pool2d with padding / ceil_mode / divisor_override has no "
                              "backward kernel; use a pool without padding")
        c = inp.meta["val"].shape[1]
        shape = [c, 1, kernel[0], kernel[1]]
        with graph.inserting_before(node):
            w = graph.call_function(aten.full.default, (shape, 1.0 / (kernel[0] * kernel[1])),
                                    {"dtype": grad.meta["val"].dtype})
            _fake(w, lambda s, v: torch.full(s, v, dtype=grad.meta["val"].dtype), shape, 1.0, like=grad)
            out_pad = _out_padding(inp.meta["val"].shape, grad.meta["val"].shape, shape, stride, [0, 0], [1, 1])
            args = (grad, w, None, stride, [0, 0], [1, 1], True, out_pad, c)
            gi = graph.call_function(aten.convolution.default, args)
            _fake(gi, aten.convolution.default, *args)
        node.replace_all_uses_with(gi)
        n_done += 1
    return n_done


def _call(graph: torch.fx.Graph, op, *args, like: torch.fx.Node | None = None, **kwargs) -> torch.fx.Node:
    node = graph.call_function(op, args, kwargs)
    _fake(node, functools.partial(op, **kwargs), *args, like=like)
    return node


def _bit_values(graph: torch.fx.Graph, like: torch.fx.Node) -> torch.fx.Node:
    """``[1, 2, 4, ..., 128]`` (uint8), made in the graph from core ATen ops."""
    two = _call(graph, aten.full.default, [8], 2, dtype=torch.uint8, like=like)
    exponents = _call(graph, aten.arange.start_step, 0, 8, dtype=torch.uint8, like=like)
    return _call(graph, aten.pow.Tensor_Tensor, two, exponents)


def _pack(graph: torch.fx.Graph, mask: torch.fx.Node) -> torch.fx.Node:
    """uint8 codes of ``mask`` (bool, numel % 8 == 0), inserted right after it: bit i of byte j is
    element 8j + i (a sum of distinct powers of two is their or)."""
    with graph.inserting_before(mask.next):
        u = _call(graph, aten._to_copy.default, mask, dtype=torch.uint8)
        u = _call(graph, aten.view.default, u, [-1, 8])
        u = _call(graph, aten.mul.Tensor, u, _bit_values(graph, mask))
        return _call(graph, aten.sum.dim_IntList, u, [1], dtype=torch.uint8)


def _unpack(graph: torch.fx.Graph, packed: torch.fx.Node, shape, before: torch.fx.Node) -> torch.fx.Node:
    with graph.inserting_before(before):
        u = _call(graph, aten.unsqueeze.default, packed, 1)
        u = _call(graph, aten.bitwise_and.Tensor, u, _bit_values(graph, packed))
        u = _call(graph, aten.ne.Scalar, u, 0)
        return _call(graph, aten.view.default, u, list(shape))


def pack_masks(graph: torch.fx.Graph, end: torch.fx.Node) -> int:
    """Bit-pack every bool tensor the forward makes for the backward (after ``activation_mask``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    packed = 0
    for node in list(graph.nodes):
        if order.get(node, 1 << 60) >= order[end] or node.op != "call_function":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.numel() % 8:
            continue
        backward = [u for u in node.users if order.get(u, 1 << 60) > order[end]]
        if not backward:
            continue
        parts = list(node.args) if node.target in _COMBINE else []
        if parts and all(isinstance(a, torch.fx.Node) and a.target in _COMPARE and len(a.users) == 1 for a in parts):
            codes = [_pack(graph, a) for a in parts]  # one comparison's bool tensor alive at a time
            last = max(codes, key=lambda c: list(graph.nodes).index(c))
            with graph.inserting_before(last.next):
                code = _call(graph, aten.bitwise_or.Tensor, *codes)
        else:
            code = _pack(graph, node)
        first = min(backward, key=lambda u: order[u])
        mask = _unpack(graph, code, val.shape, first)
        for u in backward:
            u.replace_input_with(node, mask)
        order = {n: i for i, n in enumerate(graph.nodes)}
        packed += 1
    return packed


def recompute_weights(graph: torch.fx.Graph, end: torch.fx.Node, weights: set[str]) -> int:
    """A tensor the forward computes from weights alone (an 8-bit weight dequantised, a standardised
    conv weight) is computed again right before the backward reads it: it does not live from the
    forward to the backward (a dequantised copy of every frozen weight would)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    memo: dict[torch.fx.Node, bool] = {}

    def from_weights(n: torch.fx.Node) -> bool:
        if n not in memo:
            if n.op == "placeholder":
                memo[n] = n.name in weights
            else:
                memo[n] = n.op == "call_function" and all(from_weights(a) for a in n.all_input_nodes)
        return memo[n]

    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or order[node] >= order[end] or not from_weights(node):
            continue
        backward = [u for u in node.users if order.get(u, 1 << 60) > order[end]]
        if not backward:
            continue
        chain, seen = [], set()

        def visit(n):
            if n in seen or n.op != "call_function":
                return
            seen.add(n)
            for a in n.all_input_nodes:
                visit(a)
            chain.append(n)  # inputs first

        visit(node)
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        with graph.inserting_before(min(backward, key=lambda u: order[u])):
            for n in chain:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
        for u in backward:
            u.replace_input_with(node, env[node])
        done += 1
    return done

def _numel(node) -> int:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else 0


def hoist_input_reductions(graph: torch.fx.Graph, inputs: set[str]) -> int:
    """A forward op that reads only the user's inputs (and weights) and makes a smaller tensor (a
    pooled image: Rep-Net's module 1 reads the image average-pooled) runs as soon as its inputs
    exist, so the program holds the small result instead of the image until its reader runs."""
    nodes = list(graph.nodes)
    first_op = next(n for n in nodes if n.op != "placeholder")
    early: set[torch.fx.Node] = set()
    moved = 0
    for node in nodes:
        if node.op != "call_function" or node is first_op:
            continue
        args = node.all_input_nodes
        if not args or not all(a.op == "placeholder" or a in early for a in args):
            continue
        reads_input = any(a.name in inputs or a in early for a in args)
        if not reads_input or _numel(node) >= max(_numel(a) for a in args):
            continue
        later = [a for a in args if a in early]
        if later:
            max(later, key=lambda a: nodes.index(a)).append(node)
        else:
            first_op.prepend(node)
        nodes = list(graph.nodes)
        early.add(node)
        moved += 1
    return moved


def forward_end(ep) -> torch.fx.Node:
    """The loss node: everything after it in the joint graph is the backward."""
    spec = next(s for s in ep.graph_signature.output_specs if s.kind.name == "LOSS_OUTPUT")
    return next(n for n in ep.graph_module.graph.nodes if n.name == spec.arg.name)


#: every rewrite, in the order they run ("inplace" is the memory plan's: :class:`InPlacePlanning`)
PASSES = ("frozen_conv", "activation_mask", "pack_masks", "avg_pool", "recompute_weights", "hoist_input_reductions",
          "inplace")


def run_passes(ep, passes=PASSES) -> dict:
    """The joint-graph passes named in ``passes`` on ``ep`` (in place); returns pass -> number of
    rewritten sites (``pack_masks`` needs ``activation_mask``)."""
    unknown = sorted(set(passes) - set(PASSES))
    if unknown:
        raise RepnetError(f"unknown ExecuTorch pass(es) {', '.join(unknown)}; choose from {', '.join(PASSES)}")
    graph = ep.graph_module.graph
    end = forward_end(ep)
    weights = {s.arg.name for s in ep.graph_signature.input_specs
               if s.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")}
    inputs = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    steps = {"frozen_conv": frozen_conv, "activation_mask": lambda g: activation_mask(g, end),
             "pack_masks": lambda g: pack_masks(g, end), "avg_pool": avg_pool,
             "recompute_weights": lambda g: recompute_weights(g, end, weights),
             "hoist_input_reductions": lambda g: hoist_input_reductions(g, inputs)}
    done = {name: steps[name](graph) for name in PASSES if name in passes and name in steps}
    graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return done


# ----------------------------------------------------------------------------- memory planning
#: out-variant ops whose kernels compute ``out[i]`` from ``input[i]`` only (so ``out`` may be that
#: input's storage), with the argument positions that may be overwritten
ELEMENTWISE = {"hardtanh": (0,), "relu": (0,), "clamp": (0,), "neg": (0,), "add": (0, 1), "sub": (0, 1),
               "mul": (0, 1), "div": (0,), "where": (1, 2), "bitwise_or": (0, 1), "bitwise_and": (0,), "logical_or": (0, 1),
               "ne": (0,), "eq": (0,), "le": (0,), "ge": (0,), "lt": (0,), "gt": (0,),
               "_native_batch_norm_legit_no_training": (0,), "_to_copy": (0,), "_to_dim_order_copy": (0,),
               "mask_fill": (0,)}  # (repnet::mask_fill: repnet.executorch_kernels)


def _op_name(node: torch.fx.Node) -> str | None:
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else None


def _first_spec(node: torch.fx.Node):
    spec = node.meta.get("spec")
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def share_inplace(graph_module: torch.fx.GraphModule) -> int:
    """Give an elementwise op's output the storage of an input whose last use is that op."""
    from executorch.exir import memory
    from executorch.exir.tensor import TensorSpec

    nodes = list(graph_module.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    root: dict[torch.fx.Node, torch.fx.Node] = {}  # a view -> the tensor whose storage it is
    for n in nodes:
        if n.op == "call_function" and n.target is memory.view:
            root[n] = root.get(n.args[0], n.args[0])
    last: dict[torch.fx.Node, int] = {}  # storage -> the last op that reads it (through any view)
    for n in nodes:
        for a in n.all_input_nodes:
            last[root.get(a, a)] = max(last.get(root.get(a, a), -1), order[n])
    outputs = {root.get(a, a) for n in nodes if n.op == "output" for a in n.all_input_nodes}
    shared = 0
    for n in nodes:
        positions = ELEMENTWISE.get(_op_name(n) or "", ()) if n.op == "call_function" else ()
        out = _first_spec(n)
        for i in positions:
            arg = n.args[i] if i < len(n.args) else None
            if not isinstance(arg, torch.fx.Node) or not isinstance(out, TensorSpec):
                continue
            src = root.get(arg, arg)
            base, view = _first_spec(src), _first_spec(arg)
            if (src.op != "call_function" or src in outputs or last.get(src) != order[n]
                    or not isinstance(base, TensorSpec) or base.const or out.const):
                continue
            same_bytes = out.nbytes() == base.nbytes() and out.dtype.itemsize == base.dtype.itemsize
            if same_bytes and tuple(out.shape) == tuple(view.shape):  # no broadcast of the overwritten input
                out.storage_base, out.storage_base_offset = base, 0
                shared += 1
                break
    return shared


#: orders in which :func:`offsets_by_size` places tensors (the smallest arena is kept)
PLACEMENT_ORDERS = {
    "largest, earliest first": lambda s: (-s.allocated_memory, s.lifetime[0]),
    "largest, latest first": lambda s: (-s.allocated_memory, -s.lifetime[0]),
    "largest size x lifetime first": lambda s: (-s.allocated_memory * (s.lifetime[1] - s.lifetime[0] + 1),),
}


def _place(group, key, alignment: int, base0: int, best_fit: bool) -> tuple[dict, int]:
    """Each tensor, in ``key`` order, in a free range of offsets over its lifetime (not used by a
    placed tensor alive at the same time): the lowest one, or (``best_fit``) the tightest one;
    returns (spec -> offset, arena end)."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first use, last use
    offsets, top = {}, base0
    for spec in sorted(group, key=key):
        t0, t1 = spec.lifetime
        size = spec.allocated_memory
        offset, best, cursor = None, None, base0
        for lo, hi in sorted((lo, hi) for lo, hi, a, b in placed if not (t1 < a or t0 > b)):
            if cursor + size <= lo:  # a free range [cursor, lo)
                if not best_fit:
                    offset = cursor
                    break
                if best is None or lo - cursor < best:
                    offset, best = cursor, lo - cursor
            cursor = max(cursor, -(-hi // alignment) * alignment)
        if offset is None:
            offset = cursor  # above everything alive then
        placed.append((offset, offset + size, t0, t1))
        offsets[spec] = offset
        top = max(top, offset + spec.allocated_memory)
    return offsets, top


def offsets_by_size(alignment, specs, graph_module, graph_signature, extra_padding=0, **_):
    """One arena per memory id: tensors placed one by one in a free range of offsets over their
    lifetime (lowest or tightest), in each of :data:`PLACEMENT_ORDERS`, the smallest arena kept; a storage-backed tensor
    (:func:`share_inplace`) at its base's offset."""
    from executorch.exir.memory_planning import MemoryAlgoResult, SpecAllocResult

    result = MemoryAlgoResult({}, [])
    groups: dict[int, list] = defaultdict(list)
    children = []
    for spec in specs:
        spec.realign(alignment)
        mem_id = 1 if spec.mem_id is None else spec.mem_id
        result.spec_dict[spec] = SpecAllocResult(mem_id, 0, 0)
        (children if spec.storage_base is not None else groups[mem_id]).append(spec)
    sizes = [0] * (max(groups, default=1) + 1)
    start = getattr(graph_module, "input_mem_buffer_sizes", None) or []
    for mem_id, group in groups.items():
        base0 = start[mem_id] if len(start) > mem_id else 0
        offsets, top = min((_place(group, key, alignment, base0, fit) for key in PLACEMENT_ORDERS.values()
                            for fit in (False, True)), key=lambda r: r[1])
        for obj, (spec, offset) in enumerate(offsets.items()):
            result.spec_dict[spec].mem_offset, result.spec_dict[spec].mem_obj_id = offset, obj
        sizes[mem_id] = top + extra_padding
    for spec in children:
        base, offset = spec, 0
        while base.storage_base is not None:
            offset, base = offset + base.storage_base_offset, base.storage_base
        b = result.spec_dict[base]
        result.spec_dict[spec] = SpecAllocResult(b.mem_id, b.mem_obj_id, b.mem_offset + offset)
    result.bufsizes = sizes
    return result


def InPlacePlanning():  # noqa: N802 - a pass object, named like the class it builds
    """ExecuTorch's memory planning pass with :func:`share_inplace` first and
    :func:`offsets_by_size` beside its greedy planner."""
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
    from executorch.exir.passes import MemoryPlanningPass

    class _InPlacePlanning(MemoryPlanningPass):
        shared = 0

        def run(self, graph_module, graph_signature=None):
            self.shared = share_inplace(graph_module)
            return super().run(graph_module, graph_signature)

    return _InPlacePlanning(memory_planning_algo=MemoryPlanningAlgorithmSuite([greedy, offsets_by_size]))
