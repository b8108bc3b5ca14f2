"""``repnet demo``'s budget: the methods it compares and the settings every one of them trains with.

:class:`DemoConfig` is the shared budget (112 px, 2,000 training / 1,000 test images, 3 epochs at
batch 32, no augmentation); ``DEMO_LRS`` the per-method learning rates chosen on the validation split
for this short schedule (``benchmarks/demo_lr_sweep.py``); :func:`method_config` the ``TrainConfig`` of
one compared row (a method, or ``name@key=value`` with its options). docs/demo.md says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from repnet.config.schema import TrainConfig
from repnet.keyvalue import parse_pairs


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
    options: dict = field(default_factory=dict)  # method options, for every compared method that has them
    tune: bool = False  # every method's learning rate chosen on the validation split (repnet.training.tune)


#: (lr, lr_side) per method for the demo's short schedule (3 epochs, batch 32): the best of a
#: 3-point grid per method on the validation split (benchmarks/demo_lr_sweep.py ->
#: benchmarks/results/demo_lr_sweep.json). Methods without a sweep use DEFAULT_LRS.
DEMO_LRS = {
    "repnet": (1e-3, 3e-3),
    "tinytl_lb": (1e-3, 3e-3),
    "bias": (1e-3, 1e-3),
    "last": (3e-3, 3e-3),
    "full": (1e-3, 1e-3),
}


DEFAULT_LRS = (1e-3, 3e-3)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"repnet"`` -> ("repnet", {}); ``"repnet@bn=batch,connector=up"`` -> ("repnet", {...})."""
    name, _, rest = spec.partition("@")
    return name.strip(), parse_pairs(filter(None, rest.split(",")), f"method spec '{spec}'")


def shared_options(cfg: DemoConfig, method: str) -> dict:
    """The options of ``cfg.options`` that ``method`` has (``--opt`` applies to every method that takes it)."""
    import dataclasses

    from repnet.methods import METHODS

    if method == LINEAR_PROBE:
        return {}
    known = {f.name for f in dataclasses.fields(METHODS.get(method).Options)}
    return {k: v for k, v in cfg.options.items() if k in known}


def method_config(cfg: DemoConfig, spec: str) -> TrainConfig:
    """The TrainConfig of one row: the shared budget + the method's learning rates and options."""
    method, options = parse_method(spec)
    options = {**shared_options(cfg, method), **options}
    lr, lr_side = cfg.lrs.get(spec, cfg.lrs.get(method, DEMO_LRS.get(method, DEFAULT_LRS)))
    tc = TrainConfig(
        dataset=cfg.dataset, data_root=cfg.data_root, backbone=cfg.backbone, random_init=cfg.random_init,
        method=method, options=options, memory=cfg.memory, image_size=cfg.image_size, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=lr, lr_side=lr_side, label_smoothing=cfg.label_smoothing,
        augment=cfg.augment, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
        steps_per_epoch=cfg.steps_per_epoch, seed=cfg.seed, device=cfg.device, workers=cfg.workers,
        out_dir=str(Path(cfg.out_dir) / "runs" / spec.replace("@", "_").replace(",", "_").replace("=", "-")),
        profile_memory=cfg.profile_memory,
        progress=cfg.progress, tune=cfg.tune,
    )
    tc.validate()
    return tc


# ----------------------------------------------------------------------------- the table
