"""The training configuration: one dataclass, the paper's recipes, and how they merge.

``TrainConfig`` is the single description of a training run: every field is a command-line
flag of ``repnet train`` (or ``--set key=value``), a key of ``config.yaml`` in the run folder
and of ``recipes/<dataset>.yaml``. :func:`make_config` merges defaults < the dataset's recipe <
a config file < overrides, coercing every value with :mod:`repnet.keyvalue` and validating the
result, so a bad value is one line before anything is built. No torch here: the command line
reads it to build its flags and stays fast.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RepnetError
from .keyvalue import coerce_value, type_name

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
    runtime: str = _f("eager", "where training steps run: eager (PyTorch, the memory engine) or executorch (an "
                      "ExecuTorch training program on its runtime: eval-mode forward, its SGD with momentum 0.9 "
                      "(recipes/runtime-executorch.yaml's lr / lr_side), one batch size)",
                      choices=("eager", "executorch"))
    portable: bool = _f(False, "--runtime executorch: export the program with ExecuTorch's portable kernels only "
                        "(default: repnet's own kernels, build/device/kernels/librepnet_kernels.so)")
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
        for name in ("image_size", "epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise RepnetError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_side"):
            v = getattr(self, name)
            if v is None or not (v > 0 and math.isfinite(v)):
                raise RepnetError(f"{name} must be a number > 0, got {v}")
        for name in ("steps_per_epoch", "max_steps", "train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise RepnetError(f"{name} must be >= 1 (or unset for no limit), got {v}")
        if self.checkpoint_every < 0:
            raise RepnetError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {self.checkpoint_every}")
        if self.workers < 0:
            raise RepnetError(f"workers must be >= 0, got {self.workers}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise RepnetError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.val_fraction < 1:
            raise RepnetError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not isinstance(self.options, dict):
            raise RepnetError("options must be a mapping of method options")
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


def load_runtime_recipe(runtime: str) -> dict:
    """``recipes/runtime-<runtime>.yaml`` (if there is one): what training on that runtime changes in
    every dataset's recipe (ExecuTorch: its SGD's learning rates)."""
    path = RECIPES_DIR / f"runtime-{runtime}.yaml"
    known = runtime in FIELDS["runtime"].metadata["choices"]  # (an unknown one fails in validate)
    recipe = _read_yaml(path) if known and path.is_file() else {}
    recipe.pop("description", None)
    return recipe


def _data_preset(name: str) -> dict:
    from .data import DATASET_PRESETS

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
    return coerce_value(value, type_name(FIELDS[key].type), key)


def make_config(overrides: dict | None = None, config_file: str | None = None) -> TrainConfig:
    """Merge: ``TrainConfig`` defaults < recipe of the dataset < recipe of the runtime <
    ``config_file`` < ``overrides``."""
    overrides = dict(overrides or {})
    from_file = _read_yaml(Path(config_file)) if config_file else {}
    dataset = overrides.get("dataset", from_file.get("dataset", TrainConfig.dataset))
    runtime = overrides.get("runtime", from_file.get("runtime", TrainConfig.runtime))
    merged: dict[str, Any] = {}
    for source in (load_recipe(str(dataset)), load_runtime_recipe(str(runtime)), from_file, overrides):
        for key, value in source.items():
            value = coerce(key, value)
            if key == "options":
                value = {**merged.get("options", {}), **value}
            merged[key] = value
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg


RUNTIME_KEYS = [k for k, f in FIELDS.items() if f.metadata.get("runtime")]

#: Flags whose spelling is not ``--<key with dashes>`` (repnet.commands.flags builds the rest).
FLAG_NAMES = {"out_dir": "--out", "profile_memory": "--no-profile", "progress": "--quiet"}


def cli_flag(key: str) -> str:
    """The ``repnet train`` flag of config key ``key``."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def train_arguments(overrides: dict) -> list[str]:
    """``repnet train`` arguments equivalent to ``overrides`` (for printed plans)."""
    parts: list[str] = []
    for k, v in overrides.items():
        if k == "options":
            parts += [a for ok, ov in v.items() for a in ("--opt", f"{ok}={ov}")]
        elif isinstance(v, bool) or k not in FIELDS:
            parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        else:
            parts += [cli_flag(k), str(v)]
    return parts


# ----------------------------------------------------------------------------- the demo's budget
#: ``repnet demo``'s methods ('linear_probe': logistic regression on frozen features; see repnet.demo).
DEFAULT_METHODS = ("repnet", "tinytl_lb", "bias", "last", "linear_probe", "full")
LINEAR_PROBE = "linear_probe"


@dataclass
class DemoConfig:
    out_dir: str = "demo_out"
    methods: tuple = DEFAULT_METHODS
    backbone: str = "mobilenet_v2"
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    image_size: int = 112
    train_subset: int = 2000
    test_subset: int = 1000
    epochs: int = 3
    batch_size: int = 32
    label_smoothing: float = 0.1
    augment: str = "none"
    memory: str = "engine"
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    profile_memory: bool = True
    progress: bool = True
    random_init: bool = False  # tests only
    steps_per_epoch: int | None = None  # tests only
    lrs: dict = field(default_factory=dict)  # method -> (lr, lr_side) overrides


# ----------------------------------------------------------------------------- what a config builds
def int8_settings(cfg: TrainConfig) -> dict | None:
    """The ``int8`` argument of :func:`repnet.get_model` for this config (None: fp32 training)."""
    return {"rounding": cfg.int8_rounding, "master": cfg.int8_master} if cfg.int8 else None


def build_model(cfg: TrainConfig, num_classes: int, pretrained=None, backbone=None):
    """The config's model, through the one build path (:func:`repnet.get_model`).

    ``pretrained``: default the config's (``random_init`` -> False, ``weights`` or the offline
    ImageNet weights); ``backbone``: an existing (shared) backbone object instead of a new one.
    """
    from .api import get_model

    if pretrained is None:
        pretrained = False if cfg.random_init else (cfg.weights or True)
    kwargs = {"memory": cfg.memory, **cfg.options}
    if cfg.frozen_bits != "none":
        kwargs["frozen_bits"] = cfg.frozen_bits
    if cfg.runtime == "executorch":
        from .executorch_training import program_build

        kwargs = program_build(cfg.method, cfg.options)  # the model its training program is exported from
    return get_model(backbone if backbone is not None else cfg.backbone, cfg.method, num_classes,
                     image_size=cfg.image_size, pretrained=pretrained, int8=int8_settings(cfg), **kwargs)


def build_data(cfg: TrainConfig, mean=None, std=None):
    """``(train, val or None, test, num_classes, class_names)`` from the data layer.

    ``mean`` / ``std``: the backbone's input normalisation (default: the config's backbone's).
    """
    from .data import build_datasets

    if mean is None or std is None:
        from .backbones import BACKBONES

        BACKBONES.get(cfg.backbone)
        from .backbones import create_backbone

        probe = create_backbone(cfg.backbone, pretrained=False)  # mean / std only
        mean, std = probe.mean, probe.std
    train_ds, val_ds, test_ds, num_classes, class_names = build_datasets(
        cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, mean=mean, std=std,
        val_fraction=cfg.val_fraction, seed=cfg.seed, download=cfg.download, train_subset=cfg.train_subset,
        test_subset=cfg.test_subset, augment=cfg.augment)
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None
    return train_ds, val_ds, test_ds, num_classes, class_names
