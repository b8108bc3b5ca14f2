"""ExecuTorch training programs: the model a program is built from, the export of model + loss to one
joint forward + backward graph, rewritten by the passes before memory planning, and what a program
weighs.

:func:`program_build` is the model's construction (plain layers, int8 frozen weights, GroupNorm
modules: a program normalises with fixed statistics); :func:`export_training_program` exports and
lowers it; :func:`program_memory` reports its planned arena. Ops the runtime cannot run backward are
refused at export in one line (:data:`UNSUPPORTED`). docs/runtime-executorch.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
from torch import nn
from repnet.errors import RepnetError
from repnet.runtime.executorch.passes import PASSES, run_passes
from repnet.runtime.executorch.planning import InPlacePlanning


__all__ = ["TrainStep", "EvalStep", "TrainingProgram", "export_training_program", "require_executorch",
           "program_build", "program_memory", "analytic_planned_mb", "PROGRAM_FROZEN_BITS"]


#: backward ops the portable runtime has no kernel for (or computes wrongly), with what to do instead
UNSUPPORTED = {
    "aten._adaptive_avg_pool2d_backward.default": "use a mean over H, W (global pooling) or a fixed-size avg_pool2d",
    "aten.avg_pool2d_backward.default": "no runtime kernel; the avg_pool pass rewrites it (export with the passes)",
    "aten.max_pool2d_with_indices_backward.default": "max-pool backward gives wrong gradients in ExecuTorch 1.5 "
                                                     "(pytorch/executorch#21686): freeze the layers below the pool",
    "aten.native_batch_norm_backward.default": "train-mode batch norm: use frozen statistics (bn=frozen) or GroupNorm",
    "aten._native_batch_norm_legit_functional.default": "train-mode batch norm: use frozen statistics or GroupNorm",
}


def require_executorch():
    """Import ExecuTorch (one line if it is missing), quietly: its import registers torchao's enums with
    torch's pytree, which logs a deprecation warning through the ``torch.utils._pytree`` logger (a
    ``W... _pytree.py:630 ... KernelPreference`` line); that logger is raised to ERROR for the import."""
    import logging

    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    try:
        log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import executorch  # noqa: F401
            from executorch.exir import to_edge  # noqa: F401
            from executorch.extension.training import get_sgd_optimizer  # noqa: F401
    except ImportError:
        raise RepnetError("training on the ExecuTorch runtime needs the executorch package: bash scripts/setup.sh "
                          "installs it (pip install --no-deps executorch==1.5.1 torchao==0.18.0)") from None
    finally:
        log.setLevel(level)


class TrainStep(nn.Module):
    """``model`` + its loss, as ExecuTorch trains it: ``(x, y) -> (loss, logits)``."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, x, y):
        logits = self.model(x)
        return self.loss(logits, y), logits.detach()


# ----------------------------------------------------------------------------- checks
def _check_supported(graph: torch.fx.Graph):
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in UNSUPPORTED:
            raise RepnetError(f"ExecuTorch export: {node.target} ({node.name}) cannot run on the runtime: "
                              f"{UNSUPPORTED[str(node.target)]}")


#: frozen conv / linear weights in a program: int8 codes + a scale per output channel, dequantised in
#: the graph per layer (repnet.memory.quant "linear"; the runtime has no k-means codebook lookup op)
PROGRAM_FROZEN_BITS = "linear"


def program_build(method: str, options: dict | None = None) -> dict:
    """:func:`repnet.get_model` keyword arguments of a model that a training program is exported
    from: plain PyTorch layers (``memory="vanilla"``: the passes do the engine's work), frozen weights
    in 8 bits (:data:`PROGRAM_FROZEN_BITS`), and, for a method whose modules can normalise without
    batch statistics (an option ``norm``), ``norm=group`` unless the user chose."""
    from repnet.methods import METHODS

    options = dict(options or {})
    if "norm" in {f.name for f in dataclasses.fields(METHODS.get(method).Options)}:
        options.setdefault("norm", "group")
    return {"memory": "vanilla", "frozen_bits": PROGRAM_FROZEN_BITS, **options}


def _check_norms(model: nn.Module):
    """A batch norm that trains with batch statistics (the method's own modules, e.g. Rep-Net's) would
    run with its running statistics in the program: another model. Refused in one line, as is a
    backbone whose norms use batch statistics (``--opt bn=batch``)."""
    if getattr(getattr(model, "options", None), "bn", "frozen") == "batch":
        raise RepnetError("ExecuTorch export: bn=batch (backbone norms with batch statistics) cannot run in a training "
                          "program, which normalises with fixed statistics: use bn=frozen")
    side = getattr(model, "side_modules", lambda: [])()
    for mod in side:
        for name, m in mod.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise RepnetError(f"ExecuTorch export: the method's module {type(mod).__name__} normalises with batch "
                                  f"statistics ({type(m).__name__} {name}); a training program runs norms with fixed "
                                  "statistics (train-mode batch norm does not export): use --opt norm=group "
                                  "(GroupNorm) or a method without trainable batch norms (bias, last)")


# ----------------------------------------------------------------------------- programs
@dataclasses.dataclass
class TrainingProgram:
    buffer: bytes  # the .pte
    planned_bytes: int  # the runtime's arena less the trained weights in it: activations, saved tensors,
    #                     gradients, outputs
    weights_bytes: int  # parameters and buffers of the model (frozen ones outside the arena)
    rewrites: dict  # pass -> number of rewritten sites
    trainable: list  # parameter names, in the program's order
    batch_size: int
    image_size: int
    arena_bytes: int = 0  # the whole arena (the trained weights, alive throughout, included)
    eval_arena_bytes: int = 0  # the arena of the method ``evaluate`` (0: the program has none)
    kernels: bool = False  # calls repnet's own kernels (runtime.executorch.kernels: the runtime loads the library)


class EvalStep(nn.Module):
    """``model``'s forward with its trained tensors as inputs: ``(x, *trained) -> logits`` (the
    program's method ``evaluate``; a caller hands it the training method's parameter tensors, so it
    scores the weights as they are now, with no copy of them)."""

    def __init__(self, model: nn.Module, trainable: list[str]):
        super().__init__()
        self.model, self.trainable = model, list(trainable)

    def forward(self, x, *trained):
        from torch.func import functional_call

        return functional_call(self.model, dict(zip(self.trainable, trained)), (x,), strict=False)


def _export_evaluation(model: nn.Module, trainable: list[str], x: torch.Tensor):
    from torch.export import export

    step = EvalStep(model, trainable).eval()
    trained = tuple(model.get_parameter(n).detach() for n in trainable)
    try:
        return export(step, (x, *trained), strict=False)
    except Exception as e:  # noqa: BLE001 - as for the training graph
        raise RepnetError(f"ExecuTorch export of the evaluation method failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}") from None


def export_training_program(model: nn.Module, batch_size: int, image_size: int, label_smoothing: float = 0.0,
                            rewrite: bool = True, passes=PASSES, evaluate: bool = False,
                            kernels=True) -> TrainingProgram:
    """A training program for ``model`` (a TransferModel built with ``memory="vanilla"``), rewritten
    by ``passes`` (:data:`repnet.runtime.executorch.passes.PASSES`); ``rewrite=False``: the stock export.

    ``evaluate``: the program also has a method ``evaluate`` (forward only, eval mode):
    ``(x, *trained tensors in the order of TrainingProgram.trainable) -> logits``, at the same batch
    size; its inputs are not placed in its arena (the caller's tensors are used where they are).
    ``kernels``: run on repnet's own kernels (:data:`repnet.runtime.executorch.kernels.KERNEL_PASSES`, or a
    tuple of those passes); ``False``: the portable program (ExecuTorch's kernels only)."""
    require_executorch()
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    _check_norms(model)
    step = TrainStep(model, label_smoothing).eval()
    x = torch.zeros(batch_size, 3, image_size, image_size)
    y = torch.zeros(batch_size, dtype=torch.long)
    substitutions, done = contextlib.nullcontext(), {}
    if kernels and rewrite:  # repnet's kernels: what they replace while the model is traced
        from repnet.runtime.executorch.kernels import export_substitutions

        substitutions = export_substitutions(None if kernels is True else tuple(kernels))
    try:
        with substitutions as done:
            ep = _export_forward_backward(export(step, (x, y), strict=False))
    except RepnetError:
        raise
    except Exception as e:  # noqa: BLE001 - export's own messages are long; name the failing op
        raise RepnetError(f"ExecuTorch export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    graph = ep.graph_module.graph
    passes = tuple(passes) if rewrite else ()
    rewrites = run_passes(ep, passes)
    rewrites.update(done or {})
    if kernels and rewrite:  # repnet's kernels (repnet.runtime.executorch.kernels), before memory planning
        from repnet.runtime.executorch.kernels import KERNEL_PASSES, run_kernel_passes

        rewrites.update(run_kernel_passes(ep, KERNEL_PASSES if kernels is True else tuple(kernels)))
    _check_supported(graph)
    planning = InPlacePlanning() if "inplace" in passes else None
    trainable = [s.target.removeprefix("model.") for s in ep.graph_signature.output_specs
                 if s.kind.name == "GRADIENT_TO_PARAMETER"]
    if evaluate:
        from executorch.exir.passes import MemoryPlanningPass

        eval_planning = InPlacePlanning(alloc_graph_input=False) if planning else \
            MemoryPlanningPass(alloc_graph_input=False)
        config = ExecutorchBackendConfig(memory_planning_pass={"forward": planning or MemoryPlanningPass(),
                                                               "evaluate": eval_planning})
        programs = {"forward": ep, "evaluate": _export_evaluation(model, trainable, x)}
    else:
        programs, config = ep, ExecutorchBackendConfig(memory_planning_pass=planning) if planning else None
    with warnings.catch_warnings():  # ExecuTorch's memory planning warns per backward op with an unused output
        warnings.simplefilter("ignore")  # ("Function aten.convolution_backward.out's out2 kwarg value is None")
        et = to_edge(programs).to_executorch(config)
    if planning:
        rewrites["inplace"] = planning.shared
    plans = {p.name: p for p in et.executorch_program.execution_plan}
    arena = int(sum(plans["forward"].non_const_buffer_sizes))
    eval_arena = int(sum(plans["evaluate"].non_const_buffer_sizes)) if evaluate else 0
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return TrainingProgram(et.buffer, arena - _weights_in_arena(et), int(weights), rewrites, trainable,
                           batch_size, image_size, arena, eval_arena, kernels=_uses_kernels(et.executorch_program))


def _uses_kernels(program) -> bool:
    return any(op.name.startswith("repnet::") for plan in program.execution_plan for op in plan.operators)


def _weights_in_arena(et) -> int:
    """Bytes of the parameters the memory plan placed in the arena (the trained ones: the runtime
    updates them in place), alive for the whole program."""
    ep = et.exported_program("forward")
    params = set(ep.graph_signature.inputs_to_parameters)
    total = 0
    for node in ep.graph_module.graph.nodes:
        spec = node.meta.get("spec") if node.op == "placeholder" and node.name in params else None
        if spec is not None and spec.mem_id is not None and spec.mem_offset is not None:
            total += spec.allocated_memory
    return total


def analytic_planned_mb(peak_activation_mb: float, trainable_params: int) -> float:
    """The analytic counterpart of a program's arena: the papers' peak activation x batch (MB) + a
    4-byte gradient per trainable parameter (weights are held outside the arena)."""
    return peak_activation_mb + 4 * trainable_params / 1e6


def program_memory(model: nn.Module, batch_size: int, image_size: int, rewrite: bool = True,
                   kernels: bool = True) -> dict:
    """A program's memory figures (``repnet profile --runtime executorch``, the benchmark)."""
    prog = export_training_program(model.eval(), batch_size, image_size, rewrite=rewrite, kernels=kernels)
    return {"program_planned_mb": prog.planned_bytes / 1e6, "program_arena_mb": prog.arena_bytes / 1e6,
            "program_weights_mb": prog.weights_bytes / 1e6, "program_rewrites": prog.rewrites}
