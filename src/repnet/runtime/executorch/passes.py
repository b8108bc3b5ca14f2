"""Joint-graph passes that make an ExecuTorch training program keep what repnet's engine keeps:
frozen convolutions keep nothing (their input gradient as a transposed convolution), activations a
1-bit mask, avg-pool backward as a transposed convolution, dequantised weights recomputed before the
backward, reductions of the image hoisted first. Each pass is one function of the graph; ``PASSES``
names them; docs/runtime-executorch.md explains each.
"""
from __future__ import annotations

import functools
import operator
import torch
from repnet.errors import RepnetError


__all__ = ["frozen_conv", "activation_mask", "pack_masks", "avg_pool", "forward_end",
           "recompute_weights", "hoist_input_reductions", "run_passes", "PASSES"]


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
