"""Memory planning of a training program: elementwise outputs written over inputs that die there
(ExecuTorch's ``TensorSpec.storage_base``), and a largest-first offset planner tried beside ExecuTorch's
greedy one (the smaller plan is kept).

:func:`share_inplace` does the first on the out-variant graph ``to_executorch`` plans (eval batch norm,
ReLU6, adds, ``where``, 1-byte casts, ...), as eager PyTorch's in-place ops do; :func:`offsets_by_size`
is the second; :func:`InPlacePlanning` is the pass object that applies both. docs/runtime-executorch.md.
"""
from __future__ import annotations

from collections import defaultdict
import torch


# ----------------------------------------------------------------------------- memory planning
#: out-variant ops whose kernels compute ``out[i]`` from ``input[i]`` only (so ``out`` may be that
#: input's storage), with the argument positions that may be overwritten
ELEMENTWISE = {"hardtanh": (0,), "relu": (0,), "clamp": (0,), "neg": (0,), "add": (0, 1), "sub": (0, 1),
               "mul": (0, 1), "div": (0,), "where": (1, 2), "bitwise_or": (0, 1), "bitwise_and": (0,), "logical_or": (0, 1),
               "ne": (0,), "eq": (0,), "le": (0,), "ge": (0,), "lt": (0,), "gt": (0,),
               "_native_batch_norm_legit_no_training": (0,), "_to_copy": (0,), "_to_dim_order_copy": (0,),
               "mask_fill": (0,)}  # (repnet::mask_fill: runtime.executorch.kernels)


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


def InPlacePlanning(**options):  # noqa: N802 - a pass object, named like the class it builds
    """ExecuTorch's memory planning pass with :func:`share_inplace` first and
    :func:`offsets_by_size` beside its greedy planner (``options``: ``MemoryPlanningPass``'s, e.g.
    ``alloc_graph_input=False``)."""
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
    from executorch.exir.passes import MemoryPlanningPass

    class _InPlacePlanning(MemoryPlanningPass):
        shared = 0

        def run(self, graph_module, graph_signature=None):
            self.shared = share_inplace(graph_module)
            return super().run(graph_module, graph_signature)

    return _InPlacePlanning(memory_planning_algo=MemoryPlanningAlgorithmSuite([greedy, offsets_by_size]), **options)
