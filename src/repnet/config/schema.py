"""The training configuration's schema: :class:`TrainConfig`, one dataclass whose every field is a
``repnet train`` flag, a ``--set key=value`` key and a key of ``config.yaml`` / a recipe.

``coerce`` brings a value (a command-line string or a YAML value) to its field's type; ``validate``
checks ranges and choices, so a bad value is one line before anything is built. No torch here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any
from repnet.errors import RepnetError
from repnet.keyvalue import coerce_value, type_name
from repnet.limits import (MAX_BATCH_SIZE, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_LR, MAX_STEPS,
                           MAX_WORKERS)
from repnet.runtime import runtime_names


def _f(default, help: str, choices=None, session: bool = False):
    """A config field: default, help text, allowed values (a tuple, or a function returning one: names
    from a registry); ``session`` fields are settings of one session of a run and may change on resume."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "choices": choices, "session": session})


def choices_of(key: str) -> tuple | None:
    """The allowed values of config key ``key`` (None: any value of its type)."""
    choices = FIELDS[key].metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


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
    int8: bool = _f(False, "INT8 training of the side network (docs/int8.md): 8-bit frozen backbone, "
                    "int8 weights / activations / errors in the side modules and head")
    int8_rounding: str = _f("stochastic", "rounding of the int8 errors", ("stochastic", "nearest"))
    int8_master: str = _f("fp32", "int8 master weights: fp32 copy (default), or int8 (weights kept on their int8 "
                          "grid after every step, the on-device setting)", ("fp32", "int8"))
    frozen_bits: str = _f("none", "store the frozen backbone's conv / linear weights in 8 bits: linear (per-channel "
                          "int8) or kmeans (the paper's 256-entry codebook); none: fp32 (--int8 implies linear)",
                          ("none", "linear", "kmeans"))
    # the recipe (None = from recipes/<dataset>.yaml)
    image_size: int = _f(224, "training / test resolution R")
    epochs: int = _f(50, "epochs")
    batch_size: int = _f(8, "batch size: images per forward / backward (with accum_steps > 1, a micro-batch)")
    accum_steps: int = _f(1, "gradient accumulation: one optimizer step per this many batches (loss scaled by "
                          "1/accum_steps), so batch_size x accum_steps images make one step in less memory; steps, "
                          "steps_per_epoch, max_steps and the schedule count optimizer steps")
    optimizer: str = _f("adam", "optimizer (the paper: Adam, no weight decay; adamw: decoupled weight decay; sgd: "
                        "momentum 0.9)", ("adam", "adamw", "sgd"))
    lr: float | None = _f(None, "learning rate of the head and trained backbone tensors (recipe: lr)")
    lr_side: float | None = _f(None, "learning rate of the method's side modules (recipe: lr_p)")
    weight_decay: float = _f(0.0, "weight decay (the paper: none)")
    weight_decay_side: float | None = _f(None, "weight decay of the method's side modules (default: weight_decay)")
    warmup_fraction: float = _f(0.0, "linear learning-rate warm-up over this fraction of the run's steps, then the "
                                "cosine decay (the paper: none)")
    label_smoothing: float | None = _f(None, "cross-entropy label smoothing (recipe: 0.7 fine-grained, 0.1 CIFAR)")
    augment: str = _f("preset", "training augmentation: preset (the dataset's), basic (crop + flip), "
                      "jitter (+ colour jitter), none", ("preset", "basic", "jitter", "none"))
    val_fraction: float = _f(0.1, "fraction of the training data held out for validation")
    train_subset: int | None = _f(None, "use only this many training images (quick runs)")
    test_subset: int | None = _f(None, "use only this many test images (quick runs)")
    select_best_on: str = _f("none", "none: report the final epoch (default); val: the best epoch on the "
                             "validation split; test: the best epoch on the TEST set (the released code's "
                             "optimistic protocol, for comparison only)", ("none", "val", "test"))
    tune: bool | None = _f(None, "choose the method's learning rate on the validation split first (lr_side where it has "
                           "side modules, else lr): one short trial per value of the grid, then the run with the best "
                           "(repnet.training.tune). Unset: on for a dataset without a recipe of its own "
                           "(imagefolder:<path>) where the run can tune (Adam / AdamW, a validation split, a runtime "
                           "that trains in PyTorch)")
    tune_fraction: float = _f(0.25, "length of one --tune trial, as a fraction of the run's optimizer steps (4 trials: "
                              "tuning costs about as much as the run)")
    # limits for quick runs
    steps_per_epoch: int | None = _f(None, "cap the number of steps per epoch")
    max_steps: int | None = _f(None, "cap the total number of steps (the cosine schedule spans the capped run)")
    # running
    seed: int = _f(0, "seed: model init, data order, augmentation, dropout")
    runtime: str = _f("eager", "where training steps run (see `repnet list`): eager (PyTorch, the memory engine), "
                      "executorch (an ExecuTorch training program on its runtime: eval-mode forward, its SGD with "
                      "momentum 0.9 at the runtime recipe's lr / lr_side, one batch size)", choices=runtime_names)
    portable: bool = _f(False, "a runtime that trains an ExecuTorch program (executorch, device): export it with "
                        "ExecuTorch's portable kernels only (default: repnet's own kernels, "
                        "build/device/kernels/librepnet_kernels.so)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", session=True)
    workers: int = _f(min(4, os.cpu_count() or 1), "data-loader worker processes", session=True)
    checkpoint_every: int = _f(0, "also checkpoint every N steps (0: at epoch ends only)", session=True)
    out_dir: str | None = _f(None, "run folder (default: runs/<dataset>-<backbone>-<method>-<time>)")
    profile_memory: bool = _f(True, "record analytic / measured memory (repnet.memory.profile) in results",
                              session=True)
    progress: bool = _f(True, "tqdm progress bars and per-epoch lines", session=True)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = choices_of(f.name)
            if choices and getattr(self, f.name) not in choices:
                raise RepnetError(f"{f.name}={getattr(self, f.name)!r} is not valid; choose from: {', '.join(choices)}")
        for f in dataclasses.fields(self):  # a file's config.yaml may hold any type: types first
            v = getattr(self, f.name)
            want = type_name(f.type).replace("| None", "").strip()
            ok = (v is None and "None" in type_name(f.type)) or {
                "int": isinstance(v, int) and not isinstance(v, bool), "bool": isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool), "str": isinstance(v, str),
                "dict": isinstance(v, dict)}.get(want, True)
            if not ok:
                raise RepnetError(f"{f.name}={v!r}: expected {want}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise RepnetError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise RepnetError(f"image_size must be >= 32, got {self.image_size}")
        for name, high in (("image_size", MAX_IMAGE_SIZE), ("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE),
                           ("accum_steps", MAX_BATCH_SIZE), ("steps_per_epoch", MAX_STEPS), ("max_steps", MAX_STEPS),
                           ("train_subset", MAX_STEPS), ("test_subset", MAX_STEPS), ("workers", MAX_WORKERS),
                           ("checkpoint_every", MAX_STEPS)):
            v = getattr(self, name)
            if v is not None and v > high:
                raise RepnetError(f"{name} must be <= {high:,d}, got {v:,d}")
        for name in ("lr", "lr_side"):
            v = getattr(self, name)
            if v is None or not (v > 0 and math.isfinite(v)):
                raise RepnetError(f"{name} must be a number > 0, got {v}")
            if v > MAX_LR:
                raise RepnetError(f"{name}={v:g} is absurd (at most {MAX_LR:g}; the recipes use 1e-4 .. 5e-2): it "
                                  "would diverge")
        for name in ("steps_per_epoch", "max_steps", "train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise RepnetError(f"{name} must be >= 1 (or unset for no limit), got {v}")
        if self.checkpoint_every < 0:
            raise RepnetError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {self.checkpoint_every}")
        if self.workers < 0:
            raise RepnetError(f"workers must be >= 0, got {self.workers}")
        if self.int8 and self.frozen_bits == "kmeans":
            raise RepnetError("--int8 holds the frozen weights as linear int8 codes; --frozen-bits kmeans contradicts "
                              "it (give one of them, or --frozen-bits linear)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise RepnetError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.weight_decay_side is not None and not (self.weight_decay_side >= 0
                                                       and math.isfinite(self.weight_decay_side)):
            raise RepnetError(f"weight_decay_side must be >= 0, got {self.weight_decay_side}")
        if not 0 <= self.warmup_fraction < 1:
            raise RepnetError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise RepnetError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not isinstance(self.options, dict):
            raise RepnetError("options must be a mapping of method options")
        if self.label_smoothing is None or not 0 <= self.label_smoothing < 1:
            raise RepnetError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.select_best_on == "val" and not self.val_fraction > 0:
            raise RepnetError("select_best_on=val needs a validation split (val_fraction > 0)")
        if not 0 < self.tune_fraction <= 1:
            raise RepnetError(f"tune_fraction must be in (0, 1], got {self.tune_fraction}")
        if self.tune is True and not self.val_fraction > 0:
            raise RepnetError("--tune chooses on the validation split: it needs val_fraction > 0")
        if self.tune is True and self.optimizer not in ("adam", "adamw"):
            raise RepnetError(f"--tune searches Adam's learning rates; it does not apply to --optimizer {self.optimizer}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise RepnetError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(key: str, value: Any) -> Any:
    """Check ``key`` is a config field and bring ``value`` (maybe a command-line string) to its type."""
    if key not in FIELDS:
        raise RepnetError(f"unknown config key '{key}'; valid keys: {', '.join(FIELDS)}")
    return coerce_value(value, type_name(FIELDS[key].type), key)


#: The keys a resumed run may change (device, workers, progress, ...): they do not change what it computes.
SESSION_KEYS = [k for k, f in FIELDS.items() if f.metadata.get("session")]
