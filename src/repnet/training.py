"""Training behind ``repnet train``: the paper's recipe (SPEC §5), resumable to the bit.

The recipe: Adam with two parameter groups (the method's side modules at ``lr_side``, the
head and trained backbone tensors at ``lr``), no weight decay, cosine decay per iteration
without warm-up, 50 epochs, batch 8, label smoothing per dataset, the data layer's
augmentations. Per-dataset values live in ``recipes/<dataset>.yaml``; every value can be
overridden (``TrainConfig`` field = command-line flag = ``--set key=value``).

Honest evaluation: the validation split is held out from the *training* data; the test set
is evaluated once, at the end, and the final epoch is what is reported. The released code's
"best epoch on the test set" is available as ``select_best_on=test`` and labelled as such.

Resuming: everything random is a function of the seed or saved in the checkpoint. The
per-epoch order and each image's augmentation are drawn from ``(seed, epoch, index)`` by
:class:`EpochSampler`, independent of worker processes; dropout uses the global RNG, whose
state (torch, CUDA, numpy, python) is checkpointed with the model, optimizer and scheduler.
A run killed at any moment and resumed from its last checkpoint reaches the same weights,
bit for bit on CPU, as one that was never interrupted.

Outputs in the run folder: ``config.yaml`` (the merged config), ``log.jsonl`` (one record per
epoch), ``checkpoint.pt`` (latest; written atomically), ``results.json`` and ``adapter/``
(``save_pretrained``: only the trained tensors).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import RepnetError
from .storage import atomic_write_text, clean_temps, load_checkpoint, read_safetensors, save_checkpoint, save_tensors

RECIPES_DIR = Path(__file__).parent / "recipes"


def _f(default, help: str, choices: tuple | None = None, runtime: bool = False):
    """A config field: default, help text, allowed values; ``runtime`` fields may change on resume."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "choices": choices, "runtime": runtime})


@dataclass
class TrainConfig:
    # what to train
    dataset: str = _f("fashion_mnist", "dataset name (see `repnet list`), or imagefolder:<path>")
    data_root: str | None = _f(None, "where the dataset lives on disk (default: the data layer's)")
    download: bool = _f(False, "let torchvision download the dataset when it is missing (online only)")
    backbone: str = _f("mobilenet_v2", "backbone name (see `repnet list`); the paper's is proxylessnas_mobile "
                       "(needs --weights: no offline checkpoint exists)")
    weights: str | None = _f(None, "backbone checkpoint file/URL (default: the offline ImageNet weights)")
    random_init: bool = _f(False, "randomly initialised backbone (tests only)")
    method: str = _f("repnet", "transfer method (see `repnet list`)")
    options: dict = _f(dict, "method options, e.g. {connector: dual} (CLI: --opt key=value)")
    memory: str = _f("engine", "engine: frozen layers keep nothing for backward; vanilla: plain PyTorch",
                     ("engine", "vanilla"))
    int8: bool = _f(False, "INT8 training of the side network (SPEC §8, repnet.int8): 8-bit frozen backbone, "
                    "int8 weights / activations / errors in the side modules and head")
    int8_rounding: str = _f("stochastic", "rounding of the int8 errors", ("stochastic", "nearest"))
    int8_master: str = _f("fp32", "int8 master weights: fp32 copy (default), or int8 (weights kept on their int8 "
                          "grid after every step, the on-device setting)", ("fp32", "int8"))
    # the recipe (None = from recipes/<dataset>.yaml)
    image_size: int = _f(224, "training / test resolution R")
    epochs: int = _f(50, "epochs")
    batch_size: int = _f(8, "batch size")
    optimizer: str = _f("adam", "optimizer (the paper: Adam, no weight decay)", ("adam", "sgd"))
    lr: float | None = _f(None, "learning rate of the head and trained backbone tensors (recipe: lr)")
    lr_side: float | None = _f(None, "learning rate of the method's side modules (recipe: lr_p)")
    weight_decay: float = _f(0.0, "weight decay (the paper: none)")
    label_smoothing: float | None = _f(None, "cross-entropy label smoothing (recipe: 0.7 fine-grained, 0.1 CIFAR)")
    augment: str = _f("preset", "training augmentation: preset (the dataset's), basic (crop + flip), "
                      "jitter (+ colour jitter), none", ("preset", "basic", "jitter", "none"))
    val_fraction: float = _f(0.1, "fraction of the training data held out for validation")
    train_subset: int | None = _f(None, "use only this many training images (quick runs)")
    test_subset: int | None = _f(None, "use only this many test images (quick runs)")
    select_best_on: str = _f("none", "none: report the final epoch (default); val: the best epoch on the "
                             "validation split; test: the best epoch on the TEST set (the released code's "
                             "optimistic protocol, for comparison only)", ("none", "val", "test"))
    # limits for quick runs
    steps_per_epoch: int | None = _f(None, "cap the number of steps per epoch")
    max_steps: int | None = _f(None, "cap the total number of steps (the cosine schedule spans the capped run)")
    # running
    seed: int = _f(0, "seed: model init, data order, augmentation, dropout")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", runtime=True)
    workers: int = _f(min(4, os.cpu_count() or 1), "data-loader worker processes", runtime=True)
    checkpoint_every: int = _f(0, "also checkpoint every N steps (0: at epoch ends only)", runtime=True)
    out_dir: str | None = _f(None, "run folder (default: runs/<dataset>-<backbone>-<method>-<time>)")
    profile_memory: bool = _f(True, "record analytic / measured memory (repnet.memory.profile) in results",
                              runtime=True)
    progress: bool = _f(True, "tqdm progress bars and per-epoch lines", runtime=True)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise RepnetError(f"{f.name}={getattr(self, f.name)!r} is not valid; choose from: {', '.join(choices)}")
        for name in ("image_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise RepnetError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_side"):
            if getattr(self, name) is None or not getattr(self, name) > 0:
                raise RepnetError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.label_smoothing is None or not 0 <= self.label_smoothing < 1:
            raise RepnetError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.select_best_on == "val" and not self.val_fraction > 0:
            raise RepnetError("select_best_on=val needs a validation split (val_fraction > 0)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise RepnetError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------- config merging
def load_recipe(dataset: str) -> dict:
    """``recipes/default.yaml`` updated with ``recipes/<dataset>.yaml`` (if there is one).

    A dataset without a YAML file falls back on the data layer's ``DATASET_PRESETS``.
    """
    recipe = _read_yaml(RECIPES_DIR / "default.yaml")
    base = dataset.split(":", 1)[0]
    path = RECIPES_DIR / f"{base}.yaml"
    if path.is_file():
        recipe.update(_read_yaml(path))
    else:
        recipe.update(_data_preset(base))
    recipe.pop("description", None)
    return recipe


def _data_preset(name: str) -> dict:
    try:
        from .data import DATASET_PRESETS
    except ImportError:
        return {}
    preset = DATASET_PRESETS.get(name) or {}
    if not isinstance(preset, dict):
        preset = dataclasses.asdict(preset)
    renames = {"lr_p": "lr_side"}
    return {renames.get(k, k): v for k, v in preset.items() if renames.get(k, k) in FIELDS}


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise RepnetError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RepnetError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RepnetError(f"{path} must hold a mapping of config keys")
    return data


def coerce(key: str, value: Any) -> Any:
    """Check ``key`` is a config field and bring ``value`` (maybe a command-line string) to its type."""
    if key not in FIELDS:
        raise RepnetError(f"unknown config key '{key}'; valid keys: {', '.join(FIELDS)}")
    typ = str(FIELDS[key].type)
    if isinstance(value, str) and typ != "str":
        if "None" in typ and value.lower() in ("none", "null", ""):
            return None
        value = yaml.safe_load(value)
    if value is None:
        if "None" not in typ:
            raise RepnetError(f"{key} cannot be empty")
        return None
    try:
        if typ.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ.startswith("int"):
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        return str(value)
    except (TypeError, ValueError):
        raise RepnetError(f"{key}={value!r}: expected {typ}") from None


def make_config(overrides: dict | None = None, config_file: str | None = None) -> TrainConfig:
    """Merge: ``TrainConfig`` defaults < recipe of the dataset < ``config_file`` < ``overrides``."""
    overrides = dict(overrides or {})
    from_file = _read_yaml(Path(config_file)) if config_file else {}
    dataset = overrides.get("dataset", from_file.get("dataset", TrainConfig.dataset))
    merged: dict[str, Any] = {}
    for source in (load_recipe(str(dataset)), from_file, overrides):
        for key, value in source.items():
            value = coerce(key, value)
            if key == "options":
                value = {**merged.get("options", {}), **value}
            merged[key] = value
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- data order
def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """Yields ``(index, item_seed)``: the order of epoch ``e`` is a permutation drawn from
    ``(seed, e)``, and each item's augmentation seed from ``(seed, e, index)``.

    ``start`` skips the first ``start`` items (resuming mid-epoch); ``limit`` keeps the first
    ``limit`` items of the permutation (``steps_per_epoch``).
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, limit: int | None = None):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.limit = n if limit is None else min(n, limit)

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)[: self.limit].tolist()
        for i in order[self.start:]:
            yield i, _mix(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, self.limit - self.start)


class SeededItems(Dataset):
    """Loads item ``(index, seed)`` with the torch / python RNGs seeded for its augmentation,
    restoring the caller's RNG states after (so data loading never moves dropout's RNG)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


# ----------------------------------------------------------------------------- helpers
class CosineSchedule:
    """lr factor at step s: 0.5 (1 + cos(pi s / total)); per iteration, no warm-up (picklable)."""

    def __init__(self, total_steps: int):
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over the method's two parameter groups (head + backbone tensors at
    ``lr``, side modules at ``lr_side``); in int8-master mode it re-projects after each step."""
    from .int8 import attach_int8_master

    groups = model.param_groups(cfg.lr, cfg.lr_side)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    attach_int8_master(model, optimizer)
    return optimizer


def plan_steps(n_train: int, cfg: TrainConfig, what: str = "") -> tuple[int, int]:
    """``(steps per epoch, total steps)`` for ``n_train`` images under the config's limits."""
    steps_per_epoch = n_train // cfg.batch_size
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:
        raise RepnetError(f"{what}{n_train} training images is less than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RepnetError(f"device '{name}' requested but CUDA is not available (use --device cpu)")
    return torch.device(name)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, progress: bool = False, desc: str = "eval") -> dict:
    """Mean cross-entropy (no smoothing) and top-1 accuracy over ``loader``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------- the data
def build_data(cfg: TrainConfig, mean, std):
    """Train / val / test datasets and the class list, from the data layer."""
    try:
        from .data import build_datasets
    except ImportError as e:  # the data layer is a sibling package of this one
        raise RepnetError(f"the dataset layer (repnet.data) is not available: {e}") from e
    kwargs = dict(data_root=cfg.data_root, image_size=cfg.image_size, mean=mean, std=std,
                  val_fraction=cfg.val_fraction, seed=cfg.seed, download=cfg.download,
                  train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    kwargs["augment"] = cfg.augment
    train_ds, val_ds, test_ds, num_classes, class_names = build_datasets(cfg.dataset, **kwargs)
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None
    return train_ds, val_ds, test_ds, num_classes, class_names


def _loader(ds, cfg: TrainConfig, device, sampler=None) -> DataLoader:
    return DataLoader(
        SeededItems(ds) if sampler is not None else ds,
        batch_size=cfg.batch_size if sampler is not None else max(cfg.batch_size, 64),
        sampler=sampler, shuffle=False, drop_last=sampler is not None, num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # the loader's own seed draw must not move the global RNG
    )


# ----------------------------------------------------------------------------- train
def train(config: TrainConfig, resume: str | None = None, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train ``config`` (or resume the run in folder ``resume``); returns the results dict.

    ``on_step(info)`` is called after every optimizer step with ``{"step", "epoch", "loss",
    "model", "run_dir"}`` (a hook for tests and notebooks; raising from it stops the run).
    """
    from tqdm.auto import tqdm

    from .api import get_model
    from .backbones import BACKBONES, create_backbone
    from .int8 import enable_int8_training
    from .methods import METHODS

    cfg = config
    cfg.validate()
    METHODS.get(cfg.method)  # unknown names fail before any data is read
    BACKBONES.get(cfg.backbone)
    t_start = time.time()

    # ---- the run folder
    run_dir = Path(resume if resume else cfg.out_dir or _default_run_dir(cfg))
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise RepnetError(f"cannot resume: no checkpoint.pt in {run_dir}")
        clean_temps(run_dir)
        ckpt = load_checkpoint(ckpt_path)
    else:
        if ckpt_path.exists():
            raise RepnetError(f"{run_dir} already holds a run; resume it with --resume {run_dir}, or pick --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.out_dir = str(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    device = resolve_device(cfg.device)
    say = print if cfg.progress else (lambda *a, **k: None)

    # ---- data and model (deterministic given the seed)
    pretrained = False if cfg.random_init else (cfg.weights or True)
    probe = create_backbone(cfg.backbone, pretrained=False)  # mean / std only
    train_ds, val_ds, test_ds, num_classes, class_names = build_data(cfg, probe.mean, probe.std)
    del probe
    seed_everything(cfg.seed)
    model = get_model(cfg.backbone, cfg.method, num_classes, image_size=cfg.image_size, pretrained=pretrained,
                      memory=cfg.memory, **cfg.options).to(device)
    if cfg.int8:
        enable_int8_training(model, rounding=cfg.int8_rounding, master=cfg.int8_master)
    trainable, total = model.param_counts()
    optimizer = make_optimizer(model, cfg)
    n_train = len(train_ds)
    steps_per_epoch, total_steps = plan_steps(n_train, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineSchedule(total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # ---- the training state (everything a checkpoint must restore)
    # (``elapsed`` = wall time of earlier sessions; this session's is added when saving)
    st = {"epoch": 0, "batch": 0, "step": 0,  # epochs done, batches done in the current epoch, steps done
          "last_val": None, "best_val": None, "best_val_epoch": None, "best_test": None, "best_test_epoch": None,
          "epoch_stats": [0.0, 0, 0],  # loss sum, correct, images of the current epoch so far
          "elapsed": 0.0, "train_time": 0.0, "images": 0}

    def checkpoint() -> None:
        if not _all_finite(model.trainable_state_dict().values()):
            raise RepnetError(f"weights became non-finite at epoch {st['epoch'] + 1} step {st['step']}; "
                              f"last good checkpoint: {ckpt_path}")
        save_checkpoint({
            "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "state": {**st, "elapsed": st["elapsed"] + time.time() - t_start},
            "backbone_fingerprint": model.backbone.fingerprint, "total_steps": total_steps,
        }, ckpt_path)

    if ckpt is not None:
        if ckpt["backbone_fingerprint"] != model.backbone.fingerprint:
            raise RepnetError(f"cannot resume {run_dir}: the backbone weights differ from the ones it started with")
        if ckpt["total_steps"] != total_steps:
            raise RepnetError(f"cannot resume {run_dir}: the data or limits changed ({ckpt['total_steps']} "
                              f"total steps recorded, {total_steps} now)")
        missing = set(model.trainable_state_keys()) - set(ckpt["model"])
        if missing:
            raise RepnetError(f"cannot resume {run_dir}: checkpoint lacks {sorted(missing)[:3]}")
        model.load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        st.update(ckpt["state"])
        set_rng_state(ckpt["rng"])
        _truncate_log(log_path, st["epoch"])
        say(f"resuming {run_dir} at epoch {st['epoch'] + 1}, step {st['step']}/{total_steps}")
        del ckpt
    else:
        checkpoint()  # a last good checkpoint exists from step 0 on
    elapsed_before = st["elapsed"]  # wall time of earlier sessions of this run

    val_loader = _loader(val_ds, cfg, device) if val_ds is not None else None
    say(f"{cfg.method} on {cfg.backbone} -> {cfg.dataset} ({num_classes} classes): {n_train} train / "
        f"{len(val_ds) if val_ds is not None else 0} val / {len(test_ds)} test images, {cfg.image_size}px, "
        f"batch {cfg.batch_size}, {total_steps} steps on {device}; trainable {trainable:,d} of {total:,d} params")

    # ---- the loop
    model.train()
    while st["step"] < total_steps and st["epoch"] < cfg.epochs:
        epoch = st["epoch"]
        sampler = EpochSampler(n_train, cfg.seed, epoch, start=st["batch"] * cfg.batch_size,
                               limit=steps_per_epoch * cfg.batch_size)
        loader = _loader(train_ds, cfg, device, sampler)
        n_batches = min(steps_per_epoch, st["batch"] + total_steps - st["step"])
        bar = tqdm(total=n_batches, initial=st["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not cfg.progress, dynamic_ncols=True)
        t_epoch, images_epoch = time.time(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                bar.close()
                raise RepnetError(f"loss became {loss_value} at epoch {epoch + 1} step {st['step'] + 1}; "
                                  f"last good checkpoint: {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            st["step"] += 1
            st["batch"] += 1
            stats = st["epoch_stats"]
            stats[0] += loss_value * y.numel()
            stats[1] += int((logits.detach().argmax(1) == y).sum())
            stats[2] += y.numel()
            images_epoch += y.numel()
            speed = images_epoch / max(time.time() - t_epoch, 1e-9)
            bar.set_postfix(loss=f"{stats[0] / stats[2]:.3f}", acc=f"{stats[1] / stats[2]:.3f}",
                            img_s=f"{speed:.0f}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step({"step": st["step"], "epoch": epoch, "loss": loss_value, "model": model, "run_dir": run_dir})
            if st["step"] >= total_steps or st["batch"] >= steps_per_epoch:
                break
            if cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                checkpoint()
        bar.close()
        train_secs = time.time() - t_epoch
        st["train_time"] += train_secs
        st["images"] += images_epoch

        # ---- end of epoch: validate, log, checkpoint
        loss_sum, correct, seen = st["epoch_stats"]
        rec = {"epoch": epoch + 1, "step": st["step"], "lr": optimizer.param_groups[0]["lr"],
               "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "images_per_s": images_epoch / max(train_secs, 1e-9)}
        if val_loader is not None:
            v = evaluate(model, val_loader, device)
            rec.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
            st["last_val"] = v["accuracy"]
            if st["best_val"] is None or v["accuracy"] > st["best_val"]:
                st["best_val"], st["best_val_epoch"] = v["accuracy"], epoch + 1
                if cfg.select_best_on == "val":
                    save_tensors(model.trainable_state_dict(), run_dir / "best.safetensors")
        if cfg.select_best_on == "test":  # the released code's protocol: optimistic, opt-in only
            t = evaluate(model, _loader(test_ds, cfg, device), device)
            rec.update(test_accuracy=t["accuracy"])  # selection on test: see results["note"]
            if st["best_test"] is None or t["accuracy"] > st["best_test"]:
                st["best_test"], st["best_test_epoch"] = t["accuracy"], epoch + 1
                save_tensors(model.trainable_state_dict(), run_dir / "best.safetensors")
        rec["time_s"] = elapsed_before + time.time() - t_start
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        st["epoch"], st["batch"], st["epoch_stats"] = epoch + 1, 0, [0.0, 0, 0]
        checkpoint()
        say(f"epoch {epoch + 1}/{cfg.epochs} step {st['step']}: train loss {rec['train_loss']:.4f} "
            f"acc {rec['train_accuracy']:.4f}" + (f" | val acc {rec['val_accuracy']:.4f}" if "val_accuracy" in rec else "")
            + f" | {rec['images_per_s']:.0f} img/s")

    # ---- the end: the test set, once
    test_loader = _loader(test_ds, cfg, device)
    final = evaluate(model, test_loader, device, progress=cfg.progress, desc="test")
    results = {
        "final_test_accuracy": final["accuracy"],
        "test_accuracy": final["accuracy"],
        "final_test_loss": final["loss"],
        "final_val_accuracy": st["last_val"],
        "best_val_accuracy": st["best_val"],
        "best_val_epoch": st["best_val_epoch"],
        "selected_on": cfg.select_best_on,
    }
    if cfg.select_best_on != "none":
        model.load_state_dict(read_safetensors(run_dir / "best.safetensors", "best weights", require_digest=True), strict=False)
        selected = evaluate(model, test_loader, device)
        results["test_accuracy"] = selected["accuracy"]
        results["selected_epoch"] = st["best_val_epoch"] if cfg.select_best_on == "val" else st["best_test_epoch"]
        if cfg.select_best_on == "test":
            results["note"] = "test_accuracy is the best epoch ON THE TEST SET (optimistic; the released code's protocol)"
    model.save_pretrained(str(run_dir / "adapter"))
    results.update({
        "method": cfg.method, "backbone": cfg.backbone, "dataset": cfg.dataset, "num_classes": num_classes,
        "train_images": n_train, "val_images": len(val_ds) if val_ds is not None else 0, "test_images": len(test_ds),
        "steps": st["step"], "epochs_run": st["epoch"],
        "trainable_params": trainable, "total_params": total,
        "train_images_per_s": st["images"] / max(st["train_time"], 1e-9),
        "train_time_s": st["train_time"],
        "wall_time_s": elapsed_before + time.time() - t_start,
        "device": str(device),
    })
    if cfg.profile_memory:
        try:
            results.update(memory_profile(cfg, num_classes, device))
        except Exception as e:  # noqa: BLE001 - a failed measurement must not lose a finished run
            results.update({k: None for k in MEMORY_KEYS})
            results["memory_profile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            print(f"warning: memory profile failed ({results['memory_profile_error']}); figures left empty")
    results["config"] = cfg.to_dict()
    results["run_dir"] = str(run_dir)
    results["adapter"] = str(run_dir / "adapter")
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    say(f"test accuracy {results['test_accuracy']:.4f} (final epoch {final['accuracy']:.4f}"
        + (f", best val {st['best_val']:.4f} at epoch {st['best_val_epoch']}" if st["best_val"] is not None else "")
        + f"); wrote {run_dir / 'results.json'} and {run_dir / 'adapter'}")
    return results


MEMORY_KEYS = ("analytic_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb")


def memory_profile(cfg: TrainConfig, num_classes: int, device: torch.device) -> dict:
    """The memory figures of this configuration (repnet.memory.profile), on a fresh model so the
    trained one is untouched. Missing engine -> figures are None."""
    try:
        from .memory import profile
    except ImportError:
        return {k: None for k in MEMORY_KEYS}
    from .api import get_model

    error = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = get_model(cfg.backbone, cfg.method, num_classes, image_size=cfg.image_size, pretrained=False,
                          memory=cfg.memory, **cfg.options).to(device)
        if cfg.int8:
            from .int8 import enable_int8_training

            enable_int8_training(model, rounding=cfg.int8_rounding, master=cfg.int8_master)
        try:
            rec = profile(model, batch_size=cfg.batch_size, image_size=cfg.image_size)
        except Exception as e:  # noqa: BLE001 - keep the analytic / kept figures if the peak run fails
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            rec = profile(model, batch_size=cfg.batch_size, image_size=cfg.image_size, peak=False)
    out = {k: rec.get(k) for k in MEMORY_KEYS}
    out["memory_batch_size"] = cfg.batch_size
    out["peak_kind"] = rec.get("peak_kind")
    if error:
        out["memory_profile_error"] = f"peak measurement failed: {error}"
    return out


def _default_run_dir(cfg: TrainConfig) -> str:
    ds = cfg.dataset.replace(":", "_").replace("/", "_")
    return os.path.join("runs", f"{ds}-{cfg.backbone.replace(':', '_')}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log records of epochs the resumed run will redo."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write: dropped
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= epochs_done:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- command line
_FLAGS = {  # config key -> (flag, metavar); the rest are reachable through --set key=value
    "dataset": "--dataset", "data_root": "--data-root", "backbone": "--backbone", "method": "--method",
    "weights": "--weights", "memory": "--memory", "image_size": "--image-size", "epochs": "--epochs",
    "batch_size": "--batch-size", "lr": "--lr", "lr_side": "--lr-side", "label_smoothing": "--label-smoothing",
    "augment": "--augment", "val_fraction": "--val-fraction", "train_subset": "--train-subset",
    "test_subset": "--test-subset", "select_best_on": "--select-best-on", "steps_per_epoch": "--steps-per-epoch",
    "max_steps": "--max-steps", "seed": "--seed", "device": "--device", "workers": "--workers",
    "checkpoint_every": "--checkpoint-every", "out_dir": "--out",
}


def configure_train_parser(p: argparse.ArgumentParser) -> None:
    """Add ``repnet train``'s arguments to ``p``. Unset flags take the dataset's recipe."""
    for key, flag in _FLAGS.items():
        f = FIELDS[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "the recipe's" if key in ("lr", "lr_side", "label_smoothing") else default
        choices = f.metadata.get("choices")
        text = f.metadata["help"] if "default" in f.metadata["help"] else f"{f.metadata['help']} (default: {shown})"
        p.add_argument(flag, dest=key, default=None, choices=choices, metavar=None if choices else key.upper(),
                       help=text)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable); see `repnet list -v`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable), e.g. --set download=true")
    p.add_argument("--config", metavar="YAML", help="a config file (e.g. a run's config.yaml); flags override it")
    p.add_argument("--random-init", action="store_true", default=None, help=FIELDS["random_init"].metadata["help"])
    p.add_argument("--download", action="store_true", default=None, help=FIELDS["download"].metadata["help"])
    p.add_argument("--int8", action="store_true", default=None, help=FIELDS["int8"].metadata["help"])
    p.add_argument("--no-profile", dest="profile_memory", action="store_false", default=None,
                   help="skip the memory profile at the end")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _pairs(pairs, what: str) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RepnetError(f"{what} expects key=value, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def args_to_overrides(args: argparse.Namespace) -> dict:
    overrides = {}
    for key in [*_FLAGS, "random_init", "download", "int8", "profile_memory", "progress"]:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    overrides.update(_pairs(getattr(args, "set", None), "--set"))
    opts = _pairs(getattr(args, "opt", None), "--opt")
    if opts:
        overrides["options"] = {**overrides.get("options", {}), **opts}
    return overrides


def run_train(args: argparse.Namespace) -> dict:
    """``repnet train``: build the config (recipe < --config < flags), train or resume."""
    overrides = args_to_overrides(args)
    if args.resume:
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise RepnetError(f"cannot resume: {args.resume} has no config.yaml")
        base = {k: coerce(k, v) for k, v in _read_yaml(cfg_path).items()}
        overrides = {k: coerce(k, v) for k, v in overrides.items()}
        if "options" in overrides:
            overrides["options"] = {**base.get("options", {}), **overrides["options"]}
        fixed = [k for k, v in overrides.items() if not FIELDS[k].metadata.get("runtime") and v != base.get(k)]
        if fixed:
            raise RepnetError(f"cannot change {', '.join(fixed)} when resuming (only {', '.join(RUNTIME_KEYS)})")
        cfg = TrainConfig(**{**base, **overrides})
        return train(cfg, resume=args.resume)
    return train(make_config(overrides, getattr(args, "config", None)))


RUNTIME_KEYS = [k for k, f in FIELDS.items() if f.metadata.get("runtime")]
