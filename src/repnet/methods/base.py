"""What every transfer-learning method shares.

A :class:`TransferModel` is a frozen :class:`~repnet.backbones.Backbone`, a new classifier head, and
whatever small trainable modules a method adds. Methods differ in four places only, each a method to
override: ``build()`` (create the method's modules and attach them to blocks with
``self.attach(block_index, fn)``, a forward hook ``fn(x_in, out) -> new out``),
``trainable_backbone_parameters()``, ``prepare_input(img)`` and ``join_pre_logits(feats)``. Data flows
image -> backbone blocks (hooks add the side outputs) -> pre-logits -> head; ``side_modules()`` train
at ``lr_side``, the head and backbone tensors at ``lr``. Options are a :class:`MethodOptions` dataclass
of :func:`opt` fields. docs/architecture.md, "Backbones and methods".
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from repnet.backbones import Backbone
from repnet.errors import RepnetError
from repnet.keyvalue import coerce_value, type_name
from repnet.storage import atomic_write_text, save_tensors

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def opt(default, help: str, choices: tuple | None = None, check: tuple | None = None):
    """A method option: a dataclass field with help text, optional allowed values, and an optional
    ``check = (predicate, "what it must be")`` (e.g. :data:`POSITIVE`), enforced on construction."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check})


POSITIVE = (lambda v: v > 0, "> 0")
AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
KERNEL_OR_RULE = (lambda v: v == 0 or (v >= 1 and v % 2 == 1), "0 (the size rule) or an odd size >= 1")
ODD_KERNEL = (lambda v: v >= 1 and v % 2 == 1, "an odd size >= 1")


@dataclass
class MethodOptions:
    bn: str = opt("frozen", "backbone norm statistics: frozen (fixed, backward keeps nothing) or batch "
                  "(batch statistics, as the released Rep-Net code)", ("frozen", "batch"))
    dropout: float = opt(0.2, "dropout before the new classifier", check=FRACTION)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise RepnetError(f"option {f.name}={value!r} is not valid; choose from: {', '.join(map(str, choices))}")
            check = f.metadata.get("check")
            if check and not check[0](value):
                raise RepnetError(f"option {f.name}={value!r} is not valid: it must be {check[1]}")


def parse_options(cls: type[MethodOptions], raw: dict[str, Any], method: str) -> MethodOptions:
    """Build ``cls`` from ``raw`` (values may be strings from the CLI); unknown keys list valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise RepnetError(f"unknown option '{key}' for method '{method}'; valid options: {', '.join(fields)}")
        kwargs[key] = coerce_value(value, type_name(fields[key].type), f"option {key}")
    return cls(**kwargs)


class TransferModel(nn.Module):
    """Frozen backbone + method modules + new head. Subclasses register in ``METHODS``."""

    method: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, backbone: Backbone, num_classes: int, image_size: int = 224, options: MethodOptions | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.options = options if options is not None else self.Options()
        self.head = nn.Sequential(nn.Dropout(self.options.dropout), nn.Linear(backbone.num_features, num_classes))
        nn.init.normal_(self.head[1].weight, 0, 0.01)
        nn.init.zeros_(self.head[1].bias)
        self._block_fns: dict[int, list] = {}
        self._hook_handles: list = []
        self._state: dict[str, Any] = {}
        self.build()
        self.mark_trainable()

    # ------------------------------------------------------------------ to override
    def build(self) -> None:
        """Create the method's modules and attach them to blocks (``self.attach``)."""

    def trainable_backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Backbone tensors this method trains (default: none)."""
        return iter(())

    def prepare_input(self, img: torch.Tensor) -> torch.Tensor:
        return img

    def join_pre_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Anything joined to the backbone's pre-logits before the head (default: nothing)."""
        return feats

    def side_modules(self) -> list[nn.Module]:
        """The method's added modules (trained at ``lr_side``; the head and backbone tensors at ``lr``)."""
        return [m for n, m in self.named_children() if n not in ("backbone", "head")]

    # ------------------------------------------------------------------ plumbing
    def attach(self, block_index: int, fn) -> None:
        """Run ``fn(x_in, out) -> out`` after backbone block ``block_index`` (a forward hook).

        ``fn`` should be a bound method (or a ``functools.partial`` of one) so that
        ``copy.deepcopy(model)`` rebinds it to the copy.
        """
        if block_index not in self._block_fns:
            block = self.backbone.blocks()[block_index]
            self._hook_handles.append(block.register_forward_hook(_BlockHook(self, block_index)))
            self._block_fns[block_index] = []
        self._block_fns[block_index].append(fn)

    def mark_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for m in [self.head, *self.side_modules()]:
            for p in m.parameters():
                p.requires_grad_(True)
        for _, p in self.trainable_backbone_parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            # the frozen backbone never uses dropout / drop-path; its norms use batch
            # statistics only when asked for (options.bn == "batch")
            self.backbone.eval()
            if self.options.bn == "batch":
                for m in self.backbone.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self._state = {"image": img}
        try:
            x = self.prepare_input(img)
            fmap = self.backbone.forward_features(x)
            return self.head(self.join_pre_logits(self.backbone.forward_pre_logits(fmap)))
        finally:
            self._state = {}

    # ------------------------------------------------------------------ PEFT-like surface
    def trainable_state_keys(self) -> list[str]:
        """Keys of what training changes: trained tensors, buffers of added modules, and
        backbone norm statistics when they are updated (bn=batch)."""
        keys = [n for n, p in self.named_parameters() if p.requires_grad]
        for name, _ in self.named_buffers():
            in_backbone = name.startswith("backbone.")
            if not in_backbone or (self.options.bn == "batch" and ("running_" in name or "num_batches" in name)):
                keys.append(name)
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        return {k: sd[k] for k in self.trainable_state_keys()}

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; frozen weights stored as 8-bit codes (int8 training,
        ``frozen_bits``) are buffers, not parameters, and count in the total all the same."""
        from repnet.memory.quant import quantized_weight_numel

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + quantized_weight_numel(self)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.param_counts()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    def param_groups(self, lr: float, lr_side: float | None = None) -> list[dict]:
        """Optimizer groups: the method's side modules at ``lr_side``; head and backbone tensors at ``lr``."""
        side_ids = {id(p) for m in self.side_modules() for p in m.parameters()}
        side = [p for p in self.parameters() if p.requires_grad and id(p) in side_ids]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in side_ids]
        groups = [{"params": rest, "lr": lr, "name": "head+backbone"}]
        if side:
            groups.append({"params": side, "lr": lr_side if lr_side is not None else lr, "name": "side"})
        return groups

    def config(self) -> dict:
        return {
            "method": self.method,
            "backbone": self.backbone.name,
            "backbone_fingerprint": self.backbone.fingerprint,
            "backbone_weights": self.backbone.weights,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "options": dataclasses.asdict(self.options),
            "repnet_version": repnet_version(),
            # construction options (repnet.get_model): restored by from_pretrained
            "memory": getattr(self, "memory_mode", "vanilla"),
            **({"int8": self.int8_config} if getattr(self, "int8_config", None) else {}),  # repnet.memory.int8
            **({"frozen_bits": self.frozen_bits} if getattr(self, "frozen_bits", None) else {}),
        }

    def save_pretrained(self, directory: str, overwrite: bool = False) -> None:
        """Write only what training changed: ``config.json`` + ``adapter.safetensors`` (atomic).

        A folder holding another model's adapter (other method, backbone, classes or size) is
        refused unless ``overwrite``; one holding files that are not an adapter always is.
        """
        from repnet.memory.int8 import pack_on_grid

        existing = os.path.join(directory, "config.json")
        if os.path.isdir(directory) and os.listdir(directory):
            names = set(os.listdir(directory)) - {"config.json", "adapter.safetensors"}
            if any(not n.startswith(".tmp-") for n in names):
                raise RepnetError(f"{directory} holds files that are not a repnet adapter; save into a new folder")
            if os.path.isfile(existing) and not overwrite:
                try:
                    with open(existing) as f:
                        old = json.load(f)
                except (OSError, ValueError):
                    old = None
                mine = self.config()
                keys = ("method", "backbone", "num_classes", "image_size")
                if not isinstance(old, dict) or any(old.get(k) != mine[k] for k in keys):
                    raise RepnetError(f"{directory} holds the adapter of another model; save elsewhere, or pass "
                                      "overwrite=True")

        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise RepnetError(f"cannot create {directory}: {e.strerror or e}") from None
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        tensors = pack_on_grid(self, tensors)  # int8-master weights: 1 byte each, exactly
        save_tensors(tensors, os.path.join(directory, "adapter.safetensors"))
        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(self.config(), indent=2))


class _BlockHook:
    """Forward hook object (deep-copyable, unlike a closure) dispatching to the owner's fns."""

    def __init__(self, owner: TransferModel, index: int):
        self.owner, self.index = owner, index

    def __call__(self, module, args, out):
        if not self.owner._state:  # called outside TransferModel.forward: the plain backbone
            return out
        for fn in self.owner._block_fns[self.index]:
            out = fn(args[0], out)
        return out


def repnet_version() -> str:
    try:
        from importlib.metadata import version

        return version("repnet")
    except Exception:  # noqa: BLE001
        return "unknown"
