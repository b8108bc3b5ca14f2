"""MobileTL (Chiang et al., AAAI 2023): fine-tune only the top blocks, cheaply.

In the top ``k`` non-identity blocks (and, with ``train_top``, the layers after them) every conv /
linear weight trains, a norm followed by an activation trains only its shift, ReLU-like backward is
approximated by the step ``1[x >= 0]`` (a mask is kept, not the input), and nothing below gets
gradients. Which norm is followed by an activation is read from one probe forward, so there is no
per-backbone code; the step backward is the engine's ``step_backward`` switch, or a pair of hooks where
the engine does not reach. docs/methods.md, "MobileTL".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from repnet.errors import RepnetError
from repnet.methods import METHODS
from repnet.methods.base import AT_LEAST_ONE, MethodOptions, NORM_TYPES, TransferModel, opt

# class names of the ReLU-like activations of torch and timm whose backward the step approximates
# (sigmoid-like gates are not among them: their derivative is not a step)
RELU_LIKE = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "Hardswish", "HardSwish", "HardSwishMe",
    "SiLU", "Swish", "SwishMe", "GELU", "GELUTanh", "QuickGELU", "Mish", "MishMe", "HardMish", "HardMishMe",
})
PASS_THROUGH = frozenset({"Identity", "Dropout", "Dropout2d", "DropPath", "DropBlock2d"})


class StepBackward(torch.autograd.Function):
    """Returns ``y`` (the activation's output, computed without graph) with d y / d x := 1[x >= 0]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return y.detach()  # a new tensor object: not an input returned as-is (that would be a view)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def call_order(backbone, image_size: int) -> list[str]:
    """Names (inside ``backbone.model``) of the modules in the order they start, one probe forward."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
        for n, m in backbone.model.named_modules() if n
    ]
    was_training = backbone.training
    p = next(backbone.parameters())
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    return order


def _kind(m: nn.Module) -> str:
    return type(m).__name__


@dataclass
class MobileTLOptions(MethodOptions):
    k: int = opt(4, "number of top (non-identity) blocks fine-tuned", check=AT_LEAST_ONE)
    train_top: bool = opt(True, "also fine-tune the layers between the last block and the classifier")
    step_backward: bool = opt(True, "approximate ReLU-like backward by the step 1[x >= 0] in the fine-tuned layers")


@METHODS.register("mobiletl", help="MobileTL: top-k blocks, shift-only inner norms, step-approximated activations")
class MobileTL(TransferModel):
    method = "mobiletl"
    Options = MobileTLOptions

    def build(self) -> None:
        o = self.options
        if o.k < 1:
            raise RepnetError(f"option k={o.k}: need at least one fine-tuned block")
        infos = self.backbone.describe(self.image_size)
        self.tuned_blocks = [i.index for i in infos if not i.identity][-o.k:]
        names = self.backbone.block_names
        tuned = [names[i] for i in self.tuned_blocks]

        def inside(n: str, roots) -> bool:
            return any(n == r or n.startswith(r + ".") for r in roots)

        order = call_order(self.backbone, self.image_size)
        modules = dict(self.backbone.model.named_modules())
        last = max(i for i, n in enumerate(order) if inside(n, names[-1:]))
        top = [n for n in order[last + 1:] if not inside(n, names)] if o.train_top else []
        region = [n for n in dict.fromkeys(order) if inside(n, tuned)] + list(dict.fromkeys(top))
        self.tuned_modules = region

        # norms followed by an activation: only their shift trains
        leaves = [(i, n) for i, n in enumerate(order) if not any(True for _ in modules[n].children())]
        self._shift_only: set[str] = set()
        for n in region:
            if not isinstance(modules[n], NORM_TYPES):
                continue
            start = order.index(n)
            nxt = next((modules[m] for i, m in leaves if i > start and _kind(modules[m]) not in PASS_THROUGH), None)
            if nxt is not None and _kind(nxt) in RELU_LIKE:
                self._shift_only.add(n)

        self._step_acts = [n for n in region if _kind(modules[n]) in RELU_LIKE] if o.step_backward else []
        for n in self._step_acts:
            modules[n].step_backward = True  # the memory engine's switch (used once it is applied)
            modules[n].register_forward_pre_hook(self._act_pre)
            modules[n].register_forward_hook(self._act_post)
        blocks = self.backbone.blocks()
        blocks[self.tuned_blocks[0]].register_forward_pre_hook(self._detach_input)

    def trainable_backbone_parameters(self):
        modules = dict(self.backbone.model.named_modules())
        seen = set()
        for n in self.tuned_modules:
            for pn, p in modules[n].named_parameters(recurse=False):
                if id(p) in seen or (n in self._shift_only and pn == "weight"):
                    continue
                seen.add(id(p))
                yield f"model.{n}.{pn}", p

    # ------------------------------------------------------------------ hooks (inside forward only)
    def _detach_input(self, module, args):
        if self._state:
            return (args[0].detach(), *args[1:])
        return None

    def _act_pre(self, module, args):
        if not self._state:
            return None
        x = args[0]
        stack = self._state.setdefault("step", [])
        if not x.requires_grad or _engine_steps(module):
            stack.append(None)
            return None
        stack.append((x, x >= 0))
        return (x.detach(), *args[1:])  # the activation records no graph

    def _act_post(self, module, args, out):
        if not self._state:
            return out
        entry = self._state["step"].pop()
        return out if entry is None else StepBackward.apply(*entry, out)


def _engine_steps(module: nn.Module) -> bool:
    """Whether the memory engine runs this activation with its own step backward.

    ``repnet.memory.engine`` swaps ReLU / ReLU6 / Hardtanh / Hardswish to classes with a
    ``step_backward`` switch (bit-packed masks); ``build`` sets that switch on the instance, so
    once the engine is applied it takes over and these hooks step aside.
    """
    return hasattr(type(module), "step_backward") and bool(module.step_backward)
