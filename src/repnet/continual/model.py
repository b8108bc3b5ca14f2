"""One frozen backbone shared by per-task trainable parts: :class:`MultiTaskModel` (PEFT's named
adapters for transfer methods) and its disk format.

A task is an ordinary method model built on the *same* backbone object; its hooks act only during its
own forward, so training a new task cannot change an earlier one. Methods that would change backbone
tensors are refused in one line (the naive baseline lifts the rule). A save is ``config.json`` + one
content-addressed safetensors file per task, ``config.json`` replaced last, so a save killed midway
leaves the previous one loadable. How tasks share the backbone, and which methods may:
docs/continual.md.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
import torch
from torch import nn
from repnet.api import get_model
from repnet.backbones import Backbone, create_backbone
from repnet.errors import RepnetError
from repnet.memory.int8 import unpack_on_grid
from repnet.methods import METHODS, TransferModel, parse_options
from repnet.methods.base import repnet_version
from repnet.limits import MAX_IMAGE_SIZE, MAX_NUM_CLASSES
from repnet.storage import (Spec, atomic_write_bytes, atomic_write_text, check_fields, read_json, read_safetensors,
                            tensors_to_bytes)


FORMAT = "repnet-multitask/1"
#: A file named in ``config.json``: a path inside the model's folder (``tasks/<name>-<hash>.safetensors``).
_FILE = re.compile(r"(tasks/)?[A-Za-z0-9_.-]+\.safetensors")
#: What a multi-task model's ``config.json`` holds (:meth:`MultiTaskModel.config`), checked on load.
CONFIG_FIELDS = {
    "format": str, "backbone": str, "backbone_fingerprint": str, "backbone_weights": (str, None),
    "image_size": Spec(int, low=32, high=MAX_IMAGE_SIZE), "naive": bool, "int8": Spec(dict, None, required=False),
    "active": Spec(str, None, required=False), "backbone_file": Spec(str, None, required=False),
    "tasks": Spec(list, items=Spec(dict, fields={"name": str, "method": str, "options": dict, "file": str,
                                                 "num_classes": Spec(int, low=1, high=MAX_NUM_CLASSES)})),
}


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class MultiTaskModel(nn.Module):
    """One frozen backbone shared by per-task trainable parts (PEFT's named adapters)::

        mt = MultiTaskModel("mobilenet_v2", image_size=96)
        mt.add_task("digits", 10, method="repnet")          # its own Rep-Net + head
        mt.add_task("fashion", 10, method="da3")
        logits = mt(x, task="digits")                       # or mt.set_task("digits"); mt(x)
        mt.save("multi/"); mt2 = MultiTaskModel.load("multi/")
    """

    def __init__(self, backbone: str | Backbone, image_size: int = 224, pretrained=True, memory: str = "engine",
                 naive: bool = False, int8: dict | bool | None = None):
        super().__init__()
        from repnet.api import MEMORY_MODES

        if memory not in MEMORY_MODES:
            raise RepnetError(f"unknown memory mode '{memory}'; choose from: {', '.join(MEMORY_MODES)}")
        if int(image_size) < 32:
            raise RepnetError(f"image_size must be >= 32, got {image_size}")
        self.backbone = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, pretrained)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.image_size = int(image_size)
        self.memory = memory
        self.naive = bool(naive)
        self.models = nn.ModuleDict()  # task name -> TransferModel (all on self.backbone)
        self.active: str | None = None
        if memory == "engine":
            from repnet.memory import apply_engine

            apply_engine(self.backbone)
        self.int8: dict | None = None
        if int8:  # INT8 continual learning (docs/int8.md): backbone frozen in INT8, side networks trained in INT8
            from repnet.memory.int8 import Int8Config
            from repnet.memory import quantize_frozen_weights

            if self.naive:
                raise RepnetError("int8 training needs the frozen shared backbone; it does not combine with naive")
            self.int8 = dataclasses.asdict(Int8Config(**({} if int8 is True else dict(int8))))
            quantize_frozen_weights(self.backbone, self.int8["frozen"])

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        return list(self.models.keys())

    def __getitem__(self, task: str) -> TransferModel:
        if task not in self.models:
            raise RepnetError(f"unknown task '{task}'; tasks: {', '.join(self.tasks) or '(none)'}")
        return self.models[task]

    def add_task(self, name: str, num_classes: int, method: str = "repnet", **options) -> TransferModel:
        """Add task ``name``: ``method``'s trainable parts + a ``num_classes``-way head on the
        shared backbone. It becomes the active task. Methods whose ``train_bias`` option would
        train backbone biases default to ``train_bias=False`` here (unless ``naive``)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or hasattr(nn.ModuleDict, name):
            raise RepnetError(f"task name {name!r} is not valid: use letters, digits and '_' "
                              "(not starting with a digit, not a ModuleDict attribute)")
        if name in self.models:
            raise RepnetError(f"duplicate task name '{name}'; tasks: {', '.join(self.tasks)}")
        if int(num_classes) < 1:
            raise RepnetError(f"num_classes must be >= 1, got {num_classes}")
        _, opts = self.check_method(method, **options)
        # the one build path, on the shared backbone (already on the engine / in 8 bits: unchanged)
        model = get_model(self.backbone, method, int(num_classes), self.image_size, memory=self.memory,
                          int8=self.int8, **dataclasses.asdict(opts))
        self.models[name] = model
        self.active = name
        return model

    def check_method(self, method: str, **options):
        """``(method class, parsed options)``; refuses (one-line ``RepnetError``) a method that would
        change a backbone tensor, unless ``naive``. The method is built on a probe *copy* of the
        backbone and inspected, so the shared backbone is never touched by a refused method."""
        cls = METHODS.get(method)
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        if "train_bias" in fields and "train_bias" not in options and not self.naive:
            options = {**options, "train_bias": False}
        opts = parse_options(cls.Options, options, method)
        if self.naive:
            return cls, opts
        with torch.random.fork_rng(devices=[]):
            probe = cls(copy.deepcopy(self.backbone), 2, self.image_size, copy.deepcopy(opts))
        trained = [n for n, p in probe.backbone.named_parameters() if p.requires_grad]
        why = None
        if trained:
            why = f"it trains {len(trained)} backbone tensors (e.g. {trained[0]})"
        elif getattr(probe.options, "bn", "frozen") == "batch":
            why = "bn=batch updates the backbone's norm statistics"
        if why:
            raise RepnetError(f"method '{method}' cannot share a frozen backbone across tasks: {why}; use "
                              "repnet / da3 / tinytl_l / last / side_tuning (train_bias=false, bn=frozen), or the "
                              "naive sequential baseline")
        return cls, opts

    def set_task(self, name: str) -> None:
        self[name]
        self.active = name

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        name = task or self.active
        if name is None:
            raise RepnetError("no task: add_task(...) first, or pass task=...")
        return self[name](x)

    def trainable_parameters(self, task: str | None = None) -> list[nn.Parameter]:
        """What training ``task`` changes (its side modules and head; + backbone tensors if naive)."""
        return [p for p in self[task or self.active].parameters() if p.requires_grad]

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s own trained tensors and buffers (no backbone tensor)."""
        return {k: v for k, v in self[task].trainable_state_dict().items() if not k.startswith("backbone.")}

    def stored_task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """What :meth:`save` writes for ``task``: its state, with weights that live on an int8 grid
        (``int8={"master": "int8"}``) as int8 codes + one scale (1 byte each, exactly)."""
        state = self.task_state_dict(task)
        if not self.int8 or self.int8.get("master") != "int8":
            return state
        from repnet.memory.int8 import pack_on_grid

        return pack_on_grid(self[task], state)

    def backbone_state_keys(self) -> list[str]:
        """Backbone tensors some task trains (naive baseline only; empty otherwise)."""
        keys = {k for m in self.models.values() for k in m.trainable_state_keys() if k.startswith("backbone.")}
        return sorted(keys)

    def param_counts(self, task: str) -> int:
        return sum(p.numel() for p in self.trainable_parameters(task))

    def storage(self) -> dict:
        """Bytes to store the tasks: shared backbone + per-task parts, vs one fine-tuned network per task."""
        backbone = tensor_bytes(self.backbone.state_dict().values())
        per_task = {t: tensor_bytes(self.stored_task_tensors(t).values()) for t in self.tasks}
        heads = {t: tensor_bytes(self[t].head.state_dict().values()) for t in self.tasks}
        total = backbone + sum(per_task.values())
        separate = sum(backbone + heads[t] for t in self.tasks)
        return {"backbone_bytes": backbone, "task_bytes": per_task, "total_bytes": total,
                "separate_finetuned_bytes": separate,
                "separate_over_shared": separate / total if total else None}

    # ------------------------------------------------------------------ save / load
    def config(self) -> dict:
        return {
            "format": FORMAT,
            "backbone": self.backbone.name,
            "backbone_fingerprint": self.backbone.fingerprint,
            "backbone_weights": self.backbone.weights,
            "image_size": self.image_size,
            "naive": self.naive,
            "int8": self.int8,
            "active": self.active,
            "tasks": [{"name": t, "method": m.method, "num_classes": m.num_classes,
                       "options": dataclasses.asdict(m.options)} for t, m in self.models.items()],
            "repnet_version": repnet_version(),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + one safetensors file per task (crash-safe: see the module doc)."""
        directory = Path(directory)
        (directory / "tasks").mkdir(parents=True, exist_ok=True)
        cfg = self.config()

        def put(stem: str, tensors: dict) -> str:
            blob = tensors_to_bytes(tensors)
            rel = f"{stem}-{hashlib.sha256(blob).hexdigest()[:12]}.safetensors"
            if not (directory / rel).is_file():
                atomic_write_bytes(directory / rel, blob)
            return rel

        for entry in cfg["tasks"]:
            entry["file"] = put(f"tasks/{entry['name']}", self.stored_task_tensors(entry["name"]))
        if self.naive:
            sd = self.backbone.state_dict()
            keys = [k[len("backbone."):] for k in self.backbone_state_keys()]
            cfg["backbone_file"] = put("backbone", {k: sd[k] for k in keys})
        text = json.dumps(cfg, indent=2)
        atomic_write_text(directory / "config.json", text)
        keep = {e["file"] for e in cfg["tasks"]} | {cfg.get("backbone_file")}
        for old in [*directory.glob("tasks/*.safetensors"), *directory.glob("backbone-*.safetensors")]:
            if str(old.relative_to(directory)) not in keep:
                old.unlink()

    @classmethod
    def load(cls, directory: str | os.PathLike, pretrained=True, memory: str = "engine",
             backbone: Backbone | None = None) -> "MultiTaskModel":
        """Rebuild a model written by :meth:`save`. The backbone (``pretrained``: True = the
        recorded / offline weights, or a file; or an already-built ``backbone``) must be the one
        the tasks were trained on (same name and weight fingerprint), else a one-line error."""
        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise RepnetError(f"{directory} is not a saved multi-task model (no config.json)")
        cfg = read_json(cfg_path, "multi-task config")
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise RepnetError(f"{directory} is not a saved multi-task model (format "
                              f"{cfg.get('format') if isinstance(cfg, dict) else None!r})")
        check_fields(cfg, CONFIG_FIELDS, f"multi-task config {cfg_path}")
        files = [e["file"] for e in cfg["tasks"]] + ([cfg["backbone_file"]] if cfg.get("backbone_file") else [])
        outside = [f for f in files if not _FILE.fullmatch(f) or ".." in f]
        if outside:
            raise RepnetError(f"multi-task config {cfg_path} is malformed: file {outside[0]!r} is not a file of the "
                              "model's folder")
        if backbone is None:
            if pretrained is True:
                recorded = cfg.get("backbone_weights")
                pretrained = False if recorded is None else (recorded if os.path.isfile(recorded) else True)
            backbone = create_backbone(cfg["backbone"], pretrained)
        if backbone.name != cfg["backbone"]:
            raise RepnetError(f"tasks in {directory} were trained on backbone '{cfg['backbone']}', not '{backbone.name}'")
        if backbone.fingerprint != cfg["backbone_fingerprint"]:
            raise RepnetError(f"backbone weights do not match the tasks in {directory}: they were trained on "
                              f"{cfg['backbone']} with weights fingerprint {cfg['backbone_fingerprint']}, these "
                              f"weights have {backbone.fingerprint}")
        model = cls(backbone, cfg["image_size"], memory=memory, naive=cfg["naive"], int8=cfg.get("int8"))
        for entry in cfg["tasks"]:
            m = model.add_task(entry["name"], entry["num_classes"], entry["method"], **entry["options"])
            tensors = read_safetensors(directory / entry["file"], f"task '{entry['name']}'", require_digest=True)
            device = next(backbone.parameters()).device
            tensors = unpack_on_grid({k: v.to(device) for k, v in tensors.items()})
            expected = set(model.task_state_dict(entry["name"]))
            if set(tensors) != expected:
                missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
                raise RepnetError(f"task '{entry['name']}' in {directory} does not fit its method "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
            m.load_state_dict(tensors, strict=False)
        if cfg.get("backbone_file"):
            tensors = read_safetensors(directory / cfg["backbone_file"], "backbone file", require_digest=True)
            missing = set(model.backbone_state_keys()) - {"backbone." + k for k in tensors}
            if missing:
                raise RepnetError(f"{directory}: backbone file lacks {sorted(missing)[:3]}")
            backbone.load_state_dict(tensors, strict=False)
        model.active = cfg.get("active")
        return model
