"""Training programs for the ExecuTorch runtime that keep what the engine keeps.

ExecuTorch (``.pte`` programs, a C++ runtime with Python bindings) trains a program made by
``torch.export`` of *model + loss* and ``_export_forward_backward`` (one joint forward + backward
graph), lowered with ``to_edge(...).to_executorch()`` (memory planning: every tensor gets a slot
in one arena for its lifetime). Export re-derives the backward from the ATen graph, so out of the
box it keeps what eager autograd keeps: a frozen convolution's input (for a weight gradient that
is never asked for), every ReLU6's input *copied*, ReLU outputs in float. The passes below rewrite
the joint graph before memory planning so that the planner frees those tensors after the forward:

``frozen_conv``
    ``convolution_backward`` of a conv whose weight does not train (``output_mask[1]`` false): the
    input gradient is a transposed convolution of the output gradient with the weight (and a
    bias gradient, if any, a sum of it), so the conv's forward input is no longer an input of the
    backward (:class:`repnet.memory.ops.conv` does the same in eager PyTorch).
``activation_mask``
    The backward of ReLU / ReLU6 / hardtanh reads its saved float tensor only through comparisons
    (``le(out, 0)``; ``le(in, 0) | ge(in, 6)``); those move into the forward, right after the
    tensor is made, so a bool mask (1 byte per element) is what lives until the backward.
``avg_pool``
    ``avg_pool2d_backward`` has no ExecuTorch kernel: without padding it is a transposed
    convolution of the gradient with a constant ``1 / (kh * kw)`` kernel (exact).

Frozen eval-mode batch norm needs no pass: in the joint graph its backward is already the fixed
scale ``weight / sqrt(running_var + eps)``. A backward op the runtime cannot run fails at export
in one line naming it (:data:`UNSUPPORTED`). The program runs in eval mode (frozen statistics,
no dropout), at one batch size, and trains with ExecuTorch's SGD (momentum), one optimizer per
parameter group (``lr`` for head and backbone tensors, ``lr_side`` for the method's modules).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import nn

from .errors import RepnetError

__all__ = ["TrainStep", "TrainingProgram", "export_training_program", "RuntimeTrainer", "PASSES", "require_executorch"]

aten = torch.ops.aten

#: backward ops the portable runtime has no kernel for (or computes wrongly), with what to do instead
UNSUPPORTED = {
    "aten._adaptive_avg_pool2d_backward.default": "use a mean over H, W (global pooling) or a fixed-size avg_pool2d",
    "aten.max_pool2d_with_indices_backward.default": "max-pool backward gives wrong gradients in ExecuTorch 1.5 "
                                                     "(pytorch/executorch#21686): freeze the layers below the pool",
    "aten.native_batch_norm_backward.default": "train-mode batch norm: use frozen statistics (bn=frozen) or GroupNorm",
    "aten._native_batch_norm_legit_functional.default": "train-mode batch norm: use frozen statistics or GroupNorm",
}


def require_executorch():
    try:
        import executorch  # noqa: F401
        from executorch.exir import to_edge  # noqa: F401
    except ImportError:
        raise RepnetError("training on the ExecuTorch runtime needs the executorch package: bash scripts/setup.sh "
                          "installs it (pip install --no-deps executorch==1.5.1 torchao==0.18.0)") from None


class TrainStep(nn.Module):
    """``model`` + its loss, as ExecuTorch trains it: ``(x, y) -> (loss, logits)``."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x, y):
        logits = self.model(x)
        return self.loss(logits, y), logits.detach()


# ----------------------------------------------------------------------------- passes
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


PASSES = ("frozen_conv", "activation_mask", "avg_pool")


def _forward_end(ep) -> torch.fx.Node:
    """The loss node: everything after it in the joint graph is the backward."""
    spec = next(s for s in ep.graph_signature.output_specs if s.kind.name == "LOSS_OUTPUT")
    return next(n for n in ep.graph_module.graph.nodes if n.name == spec.arg.name)


def _check_supported(graph: torch.fx.Graph):
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in UNSUPPORTED:
            raise RepnetError(f"ExecuTorch export: {node.target} ({node.name}) cannot run on the runtime: "
                              f"{UNSUPPORTED[str(node.target)]}")


def _check_norms(model: nn.Module):
    """A batch norm that trains with batch statistics (the method's own modules, e.g. Rep-Net's) would
    run with its running statistics in the program: another model. Refused in one line."""
    side = getattr(model, "side_modules", lambda: [])()
    for mod in side:
        for name, m in mod.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise RepnetError(f"ExecuTorch export: the method's module {type(mod).__name__} normalises with batch "
                                  f"statistics ({type(m).__name__} {name}); a training program runs norms with fixed "
                                  "statistics (train-mode batch norm does not export): use a method without "
                                  "trainable batch norms (bias, last)")


# ----------------------------------------------------------------------------- programs
@dataclasses.dataclass
class TrainingProgram:
    buffer: bytes  # the .pte
    planned_bytes: int  # the runtime's arena: activations, saved tensors, gradients, outputs
    weights_bytes: int  # parameters and buffers of the model (held outside the arena)
    rewrites: dict  # pass -> number of rewritten sites
    trainable: list  # parameter names, in the program's order
    batch_size: int
    image_size: int


def export_training_program(model: nn.Module, batch_size: int, image_size: int, label_smoothing: float = 0.0,
                            rewrite: bool = True, allow_batch_stats: bool = False) -> TrainingProgram:
    """A training program for ``model`` (a TransferModel built with ``memory="vanilla"``).

    ``allow_batch_stats``: export even when the method's modules have batch norms (they then run
    with fixed statistics: another model than eager training; for memory figures only)."""
    require_executorch()
    from executorch.exir import to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    if not allow_batch_stats:
        _check_norms(model)
    step = TrainStep(model, label_smoothing).eval()
    x = torch.zeros(batch_size, 3, image_size, image_size)
    y = torch.zeros(batch_size, dtype=torch.long)
    try:
        ep = _export_forward_backward(export(step, (x, y), strict=False))
    except RepnetError:
        raise
    except Exception as e:  # noqa: BLE001 - export's own messages are long; name the failing op
        raise RepnetError(f"ExecuTorch export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    graph = ep.graph_module.graph
    rewrites = {}
    if rewrite:
        rewrites["frozen_conv"] = frozen_conv(graph)
        rewrites["activation_mask"] = activation_mask(graph, _forward_end(ep))
        rewrites["avg_pool"] = avg_pool(graph)
        graph.eliminate_dead_code()
        ep.graph_module.recompile()
    _check_supported(graph)
    if any(n.target is aten.avg_pool2d_backward.default for n in graph.nodes):
        raise RepnetError("ExecuTorch export: avg_pool2d_backward has no runtime kernel (export with the rewrite)")
    et = to_edge(ep).to_executorch()
    plan = et.executorch_program.execution_plan[0]
    trainable = [s.target.removeprefix("model.") for s in ep.graph_signature.output_specs
                 if s.kind.name == "GRADIENT_TO_PARAMETER"]
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return TrainingProgram(et.buffer, int(sum(plan.non_const_buffer_sizes)), int(weights), rewrites, trainable,
                           batch_size, image_size)


class RuntimeTrainer:
    """Runs a :class:`TrainingProgram` on the ExecuTorch runtime: one ``step(x, y)`` is its
    ``forward_backward`` and an SGD step per parameter group; the trained tensors are copied back
    into ``model`` after every step, so evaluation, checkpoints and adapters work on ``model``."""

    def __init__(self, model: nn.Module, program: TrainingProgram, lr: float, lr_side: float, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        require_executorch()
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

        self.model, self.program = model, program
        self.module = _load_for_executorch_for_training_from_buffer(program.buffer)
        self._make_sgd = lambda params, lr_: get_sgd_optimizer(params, lr_, momentum, 0.0, weight_decay, False)
        groups = model.param_groups(lr, lr_side) if hasattr(model, "param_groups") else \
            [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
        by_lr: dict[float, list[str]] = {}
        for n, p in model.named_parameters():
            if n in program.trainable:
                by_lr.setdefault(lr_of.get(id(p), lr), []).append(n)
        self.groups = by_lr
        self.optimizers = None
        self.params = dict(model.named_parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != self.program.batch_size:
            raise RepnetError(f"the ExecuTorch program trains batches of {self.program.batch_size}, got {x.shape[0]}")
        loss, logits = self.module.forward_backward("forward", (x.contiguous(), y.contiguous()))
        grads = self.module.named_gradients()
        if self.optimizers is None:  # the runtime hands out its parameters after the first call
            named = {k.removeprefix("model."): v for k, v in self.module.named_parameters().items()}
            self._named = named
            self.optimizers = [(self._make_sgd({f"model.{n}": named[n] for n in names}, lr), names)
                               for lr, names in self.groups.items() if names]
        for opt, names in self.optimizers:
            opt.step({f"model.{n}": grads[f"model.{n}"] for n in names})
        with torch.no_grad():
            for n, t in self._named.items():
                self.params[n].copy_(t)
        return loss, logits
