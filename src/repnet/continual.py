"""Multi-domain / continual learning over ONE frozen backbone.

Each new task gets its own small trainable parts (a Rep-Net, DA3 adaptors, lite residuals, ...,
and a classifier head); the backbone is shared and never changes, so what earlier tasks learned
cannot be overwritten (SPEC §8: DA3's per-domain adaptors, the Fan group's continual Rep-Net).

How the sharing works: a task is an ordinary :class:`~repnet.methods.TransferModel` built on
the *same* :class:`~repnet.backbones.Backbone` object. Its side modules attach to the backbone's
blocks with forward hooks, but a hook only acts during its own model's forward (``_BlockHook``
checks its owner's per-forward state), so task A's hooks are inert while task B runs, and vice
versa. The memory engine (``memory="engine"``) swaps the classes of the shared backbone's layers
once and of each task's own layers as the task is added.

Which methods can share the backbone: those that train no backbone tensor and keep its norm
statistics fixed - ``repnet``, ``da3`` (both with ``train_bias=False``, which is the default
here), ``tinytl_l``, ``last``, ``side_tuning``, ``input_reprogram``. Methods that change backbone
tensors (``bias``, ``norm_last``, ``full``, ``tinytl_lb``, ``mobiletl``, any ``train_bias=true``
or ``bn=batch``) are refused with a one-line error: per-task copies of the changed tensors would
be possible, but a per-task copy of every bias / norm is exactly the storage and bookkeeping this
design avoids, and for ``full`` it is N whole networks. The check is generic (a probe copy of
the backbone is built with the method and inspected), so a new method needs no entry here.

The *naive* baseline (``MultiTaskModel(..., naive=True)``) lifts that rule: the tasks train
backbone tensors in place, one after another, in one shared network with a head per task. That
is sequential fine-tuning, which forgets; it exists to measure the contrast.

Storage (:meth:`MultiTaskModel.save`): ``config.json`` (backbone name and weight fingerprint,
the tasks in order with method, classes and options) and ``tasks/<name>-<hash>.safetensors``
per task (only that task's trained tensors; ``backbone-<hash>.safetensors`` for the naive
baseline's trained backbone tensors). Files are content-addressed and ``config.json`` is
replaced last, atomically: a save killed midway leaves the previous save loadable.

``method="hyblearn"`` (:mod:`repnet.hyblearn`) is the other end of the trade-off: one shared
backbone whose tiles are partly retrained per task (a head per task), the tiles most correlated
with the earlier tasks frozen.

:func:`train_sequence` trains tasks one after another (the ``repnet train`` recipe per dataset)
and, after each, evaluates every task seen so far: the accuracy matrix, average accuracy,
backward transfer and forgetting, and what it all costs to store. ``repnet continual`` is its
command line.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from . import loop
from .api import get_model
from .backbones import Backbone, create_backbone
from .errors import RepnetError
from .hyblearn import HybLearn
from .int8 import unpack_on_grid
from .methods import METHODS, TransferModel, parse_options
from .methods.base import _version
from .registry import Registry
from .storage import (RunKind, atomic_write_bytes, atomic_write_text, check_resumable, claim_folder, read_json,
                      read_safetensors, set_run_state,
                      save_tensors, tensors_to_bytes)

FORMAT = "repnet-multitask/1"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: Continual methods that are more than one adapter per task: name -> driver class (``Options``,
#: ``task_model``, ``before_task`` / ``after_task``, ``state`` / ``load_state``; see ``HybLearn``).
#: Any transfer method of ``METHODS`` is also a continual method (one adapter per task).
CONTINUAL_METHODS: Registry = Registry("continual method")
CONTINUAL_METHODS.register("hyblearn", help="Hyb-Learn (DAC 2024): per task, freeze the backbone tiles most "
                           "correlated with earlier tasks, retrain the rest (repnet.hyblearn)")(HybLearn)


def _tensor_bytes(tensors) -> int:
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
        from .api import MEMORY_MODES

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
            from .memory import apply_engine

            apply_engine(self.backbone)
        self.int8: dict | None = None
        if int8:  # SPEC §8: the backbone frozen in INT8, each task's side network trained in INT8
            from .int8 import Int8Config
            from .memory import quantize_frozen_weights

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
        from .int8 import pack_on_grid

        return pack_on_grid(self[task], state)

    def backbone_state_keys(self) -> list[str]:
        """Backbone tensors some task trains (naive baseline only; empty otherwise)."""
        keys = {k for m in self.models.values() for k in m.trainable_state_keys() if k.startswith("backbone.")}
        return sorted(keys)

    def param_counts(self, task: str) -> int:
        return sum(p.numel() for p in self.trainable_parameters(task))

    def storage(self) -> dict:
        """Bytes to store the tasks: shared backbone + per-task parts, vs one fine-tuned network per task."""
        backbone = _tensor_bytes(self.backbone.state_dict().values())
        per_task = {t: _tensor_bytes(self.stored_task_tensors(t).values()) for t in self.tasks}
        heads = {t: _tensor_bytes(self[t].head.state_dict().values()) for t in self.tasks}
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
            "repnet_version": _version(),
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
            raise RepnetError(f"{directory} is not a saved multi-task model (format {cfg.get('format')!r})")
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


# ----------------------------------------------------------------------------- metrics
def continual_metrics(acc: list[list[float | None]]) -> dict:
    """From ``acc[i][j]`` (test accuracy on task j after training task i; None for j > i):

    * ``average_accuracy``: mean of the last row;
    * ``backward_transfer`` (Lopez-Paz & Ranzato 2017): mean over j < T-1 of acc[T-1][j] - acc[j][j]
      (negative = forgetting);
    * ``forgetting`` (Chaudhry et al. 2018): per task j < T-1, max over i < T-1 of acc[i][j] minus
      acc[T-1][j]; ``average_forgetting`` their mean (None with a single task).
    """
    T = len(acc)
    last = acc[-1]
    old = range(T - 1)
    forgetting = [max(acc[i][j] for i in range(j, T - 1)) - last[j] for j in old]
    return {
        "average_accuracy": sum(last) / T,
        "backward_transfer": sum(last[j] - acc[j][j] for j in old) / (T - 1) if T > 1 else None,
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else None,
    }


# ----------------------------------------------------------------------------- training driver
def parse_tasks(tasks) -> list[tuple[str, str]]:
    """``"digits,fashion_mnist"`` or a list; an entry is ``dataset`` or ``name=dataset`` -> (name, dataset)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    out = []
    for t in tasks:
        name, sep, ds = str(t).strip().partition("=")
        if not sep:
            ds = name
            name = re.sub(r"[^A-Za-z0-9_]", "_", ds)
        if not name or not ds:
            raise RepnetError(f"--tasks: empty task in {','.join(map(str, tasks))!r}")
        out.append((name, ds))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RepnetError(f"duplicate task name '{dup[0]}' in --tasks (name them: a={dup[0]},b={dup[0]})")
    if not out:
        raise RepnetError("--tasks: give at least one dataset")
    return out


def train_sequence(tasks, backbone: str = "mobilenet_v2", method: str = "repnet", naive: bool = False,
                   out_dir: str | os.PathLike | None = None, options: dict | None = None, resume: bool = False,
                   overwrite: bool = False, **overrides) -> dict:
    """Train ``tasks`` (datasets, or ``name=dataset``) one after another on one shared backbone.

    Each task gets ``method`` (its own side modules + head; ``naive``: in-place sequential
    fine-tuning of backbone tensors instead) and is trained with that dataset's ``repnet train``
    recipe (``TrainConfig``; ``overrides`` = any of its keys, e.g. ``epochs=2, image_size=64,
    train_subset=1000``). The validation split defaults to none (``val_fraction=0``): nothing is
    selected, the final epoch is what is evaluated. After each task every task seen so far is
    evaluated on its test split. Writes ``OUT/results.json`` (after every task, atomically) and
    ``OUT/model/`` (:meth:`MultiTaskModel.save`); returns the results dict.

    ``resume=True`` continues an interrupted sequence in ``out_dir`` after its last finished
    task (same tasks and settings): each task starts from its own seed, so the result is the
    one an uninterrupted run gives, bit for bit. A task cut off midway is trained again.
    """
    from .config import build_data, make_config
    from .loop import CosineSchedule, evaluate, make_loader, make_optimizer, plan_steps, resolve_device, seed_everything

    pairs = parse_tasks(tasks)
    overrides = {"val_fraction": 0.0, **overrides}
    for bad in ("dataset", "method", "backbone", "options", "out_dir"):
        if bad in overrides:
            raise RepnetError(f"train_sequence: '{bad}' is not a per-run override here")
    if overrides.get("select_best_on", "none") != "none":
        raise RepnetError("continual runs report the final epoch of each task (select_best_on=none)")
    cfgs = [make_config({**overrides, "dataset": ds, "backbone": backbone, "method": method,
                         "options": dict(options or {})}) for _, ds in pairs]
    base = cfgs[0]
    driver_cls, driver_options, task_method, task_options = None, None, method, dict(base.options)
    if method in CONTINUAL_METHODS:  # a method that decides per task what trains (e.g. hyblearn)
        driver_cls = CONTINUAL_METHODS.get(method)
        driver_options = parse_options(driver_cls.Options, base.options, method)
        task_method, task_options = driver_cls.task_model(driver_options, base, naive)
    else:
        METHODS.get(method)
    device = resolve_device(base.device)
    say = print if base.progress else (lambda *a, **k: None)
    if resume and not out_dir:
        raise RepnetError("resuming a continual run needs its folder (--out)")
    out = Path(out_dir or os.path.join("runs", f"continual-{backbone}-{method}{'-naive' if naive else ''}-"
                                                f"{time.strftime('%Y%m%d-%H%M%S')}"))
    previous = None
    if resume:
        previous = _resumable(out, pairs, cfgs, backbone, method, naive)
    else:
        claim_folder(out, kind=RUN, overwrite=overwrite)

    pretrained = False if base.random_init else (base.weights or True)
    seed_everything(base.seed)
    int8 = {"rounding": base.int8_rounding, "master": base.int8_master} if base.int8 else None
    if previous is not None:
        model = MultiTaskModel.load(out / "model", pretrained=pretrained, memory=base.memory)
    else:
        model = MultiTaskModel(backbone, base.image_size, pretrained=pretrained, memory=base.memory,
                               naive=naive or driver_cls is not None, int8=int8)
    model.to(device)
    model.check_method(task_method, **task_options)  # refuse a method before any data is read
    driver = None
    if driver_cls is not None:
        driver = driver_cls(driver_options, model.backbone)
        if previous is not None:
            state = out / str(previous.get("state_file"))
            driver.load_state(read_safetensors(state, f"{method} state", require_digest=True), str(state))

    data = {}
    for (name, ds), cfg in zip(pairs, cfgs):
        train_ds, _, test_ds, num_classes, _ = build_data(cfg, model.backbone.mean, model.backbone.std)
        data[name] = (train_ds, test_ds, num_classes)

    acc: list[list[float | None]] = []
    per_task: list[dict] = []
    results: dict = {}
    t_run = time.time()
    done = 0
    if previous is not None:
        acc, per_task, done = previous["acc"], previous["per_task"], len(previous["tasks"])
        t_run -= previous["wall_time_s"]
        say(f"resuming {out}: {done} of {len(pairs)} tasks done ({', '.join(previous['tasks'])})")
    for i, ((name, ds), cfg) in enumerate(zip(pairs, cfgs)):
        if i < done:
            continue
        train_ds, test_ds, num_classes = data[name]
        seed_everything(cfg.seed + i)
        tm = model.add_task(name, num_classes, task_method, **task_options)
        record = {}
        if driver is not None:
            record = driver.before_task(tm, train_ds, cfg, device, seed=cfg.seed + i, name=f"task '{name}'")
            say("  " + driver.summary(record))
        params = model.trainable_parameters(name)
        optimizer = make_optimizer(tm, cfg)
        steps_per_epoch, total_steps = plan_steps(len(train_ds), cfg, f"task '{name}': ")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(total_steps))
        say(f"task {i + 1}/{len(pairs)} '{name}' ({ds}, {num_classes} classes): {method}{' (naive)' if naive else ''} "
            f"on {backbone}, {len(train_ds)} train / {len(test_ds)} test images, {cfg.image_size}px, "
            f"{total_steps} steps on {device}; trainable {sum(p.numel() for p in params):,d} params")
        model.set_task(name)
        t0 = time.time()
        st = loop.fit(model, train_ds, cfg, device, optimizer, scheduler=scheduler, seed=cfg.seed + i,
                      name=f"task '{name}'")
        step, images = st["step"], st["images"]
        train_time = time.time() - t0
        if driver is not None:
            record.update(driver.after_task(tm))
        model.eval()
        row = []
        for j, (other, _) in enumerate(pairs[: i + 1]):
            r = evaluate(model[other], make_loader(data[other][1], cfgs[j], device), device,
                         progress=cfg.progress, desc=f"test {other}")
            row.append(r["accuracy"])
        acc.append(row + [None] * (len(pairs) - i - 1))
        say(f"  after '{name}': " + ", ".join(f"{t} {a:.4f}" for (t, _), a in zip(pairs, row)))
        per_task.append({"name": name, "dataset": ds, "num_classes": num_classes, "train_images": len(train_ds),
                         "test_images": len(test_ds), "steps": step, "train_time_s": train_time,
                         "train_images_per_s": images / max(train_time, 1e-9),
                         "trainable_params": sum(p.numel() for p in params),
                         "lr": cfg.lr, "lr_side": cfg.lr_side, "label_smoothing": cfg.label_smoothing,
                         **({method: record} if driver is not None else {})})
        model.save(out / "model")
        state_file = f"{method}-state-{i + 1}.safetensors"
        if driver is not None:  # one file per finished task: results.json names the one that fits it
            save_tensors(driver.state(), out / state_file)
        storage = model.storage()
        for rec in per_task:
            rec["adapter_bytes"] = storage["task_bytes"][rec["name"]]
        if naive or driver is not None:
            storage["trained_backbone_bytes"] = _tensor_bytes(
                model.backbone.state_dict()[k[len("backbone."):]] for k in model.backbone_state_keys())
        square = [[a for a in r[: k + 1]] for k, r in enumerate(acc)]
        results = {
            "backbone": backbone, "method": method, "naive": naive,
            "policy": "naive sequential fine-tuning (shared backbone tensors train in place)" if naive
            else driver.policy if driver is not None
            else "frozen shared backbone, per-task trainable parts",
            **({method: dataclasses.asdict(driver_options), "state_file": state_file} if driver is not None else {}),
            "tasks": [n for n, _ in pairs[: i + 1]],
            "acc": acc[: i + 1], **continual_metrics(square),
            "per_task": per_task, "storage": storage,
            "backbone_fingerprint": model.backbone.fingerprint,
            "image_size": base.image_size, "epochs": base.epochs, "batch_size": base.batch_size,
            "device": str(device), "wall_time_s": time.time() - t_run,
            "configs": [c.to_dict() for c in cfgs[: i + 1]], "model": str(out / "model"),
            "complete": i == len(pairs) - 1,
        }
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        for old in out.glob("*-state-*.safetensors"):
            if old.name != results.get("state_file"):
                old.unlink()
    set_run_state(out, RUN, "finished")
    print(format_matrix(results))  # the result itself: printed even with --quiet
    say(f"wrote {out / 'results.json'} and {out / 'model'}")
    return results


_RUNTIME = ("progress", "workers", "device")


def _verify_run(out: Path) -> None:
    """Raise unless ``out`` holds a continual run of ours: its results and a saved multi-task model."""
    prev = read_json(out / "results.json", "continual results")
    cfg_file = out / "model" / "config.json"
    if not (isinstance(prev, dict) and "policy" in prev and cfg_file.is_file()
            and read_json(cfg_file, "multi-task config").get("format") == FORMAT):
        raise RepnetError(f"--overwrite: {out} does not hold a continual run; give a new or empty folder")


#: A continual run folder (``overwrite=True`` replaces exactly these files, once verified as ours).
RUN = RunKind("continual run", "results.json", ("results.json", "model", "*-state-*.safetensors"), _verify_run,
              "repnet continual")


def _resumable(out: Path, pairs, cfgs, backbone: str, method: str, naive: bool) -> dict:
    """The earlier results of the run in ``out``, checked against what is asked now."""
    path = out / "results.json"
    check_resumable(out, RUN)
    if not (out / "model" / "config.json").is_file():
        raise RepnetError(f"cannot resume: {out} holds no continual run (results.json and model/)")
    prev = read_json(path, "continual results")
    if prev.get("complete"):
        raise RepnetError(f"{out} is complete: nothing to resume")
    names = [n for n, _ in pairs]
    same = (prev["backbone"], prev["method"], prev["naive"]) == (backbone, method, naive)
    if not same or prev["tasks"] != names[: len(prev["tasks"])]:
        raise RepnetError(f"cannot resume {out}: it is {prev['method']}{' (naive)' if prev['naive'] else ''} on "
                          f"{prev['backbone']} with tasks {','.join(prev['tasks'])}, not this sequence")
    for old, new in zip(prev["configs"], cfgs):
        changed = sorted(k for k, v in new.to_dict().items() if k not in _RUNTIME and old.get(k) != v)
        if changed:
            raise RepnetError(f"cannot resume {out}: settings changed ({', '.join(changed)})")
    return prev


def format_matrix(results: dict) -> str:
    """The accuracy matrix (rows: after training task i; columns: task j) and the summary."""
    names = results["tasks"]
    w = max(12, *(len(n) + 2 for n in names))
    lines = [f"{results['method']}{' (naive)' if results['naive'] else ''} on {results['backbone']}: "
             "test accuracy after each task",
             "after \\ on".ljust(w) + "".join(n.rjust(w) for n in names)]
    for n, row in zip(names, results["acc"]):
        lines.append(n.ljust(w) + "".join(("-" if a is None else f"{a:.4f}").rjust(w) for a in row[: len(names)]))
    bwt, fgt = results["backward_transfer"], results["average_forgetting"]
    lines.append(f"average accuracy {results['average_accuracy']:.4f}"
                 + ("" if bwt is None else f" | backward transfer {bwt:+.4f} | average forgetting {fgt:.4f}"))
    st = results["storage"]
    lines.append(f"storage: {st['total_bytes'] / 1e6:.2f} MB shared (backbone {st['backbone_bytes'] / 1e6:.2f} MB + "
                 f"tasks {sum(st['task_bytes'].values()) / 1e6:.3f} MB) vs {st['separate_finetuned_bytes'] / 1e6:.2f} MB "
                 f"for {len(names)} separately fine-tuned networks")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
