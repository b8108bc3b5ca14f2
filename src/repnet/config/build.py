"""What a config builds: its model (through the one build path, :func:`repnet.get_model`, with what
its runtime needs) and its data splits (the data layer).

:func:`build_model` asks the config's runtime for the model's keyword arguments (the eager runtime:
memory mode, method options, frozen bits; ExecuTorch: the model its program is exported from) and
:func:`int8_settings` for the INT8 construction option; :func:`build_data` returns the train / val /
test splits normalised with the backbone's statistics.
"""
from __future__ import annotations

from repnet.config.schema import TrainConfig
from repnet.runtime import get_runtime



# ----------------------------------------------------------------------------- what a config builds
def int8_settings(cfg: TrainConfig) -> dict | None:
    """The ``int8`` argument of :func:`repnet.get_model` for this config (None: fp32 training)."""
    return {"rounding": cfg.int8_rounding, "master": cfg.int8_master} if cfg.int8 else None


def build_model(cfg: TrainConfig, num_classes: int, pretrained=None, backbone=None):
    """The config's model, through the one build path (:func:`repnet.get_model`).

    ``pretrained``: default the config's (``random_init`` -> False, ``weights`` or the offline
    ImageNet weights); ``backbone``: an existing (shared) backbone object instead of a new one.
    """
    from repnet.api import get_model

    if pretrained is None:
        pretrained = False if cfg.random_init else (cfg.weights or True)
    kwargs = get_runtime(cfg.runtime).model_kwargs(cfg)  # what the runtime trains (e.g. a program's model)
    return get_model(backbone if backbone is not None else cfg.backbone, cfg.method, num_classes,
                     image_size=cfg.image_size, pretrained=pretrained, int8=int8_settings(cfg), **kwargs)


def build_data(cfg: TrainConfig, mean=None, std=None):
    """``(train, val or None, test, num_classes, class_names)`` from the data layer.

    ``mean`` / ``std``: the backbone's input normalisation (default: the config's backbone's).
    """
    from repnet.data import build_datasets

    if mean is None or std is None:
        from repnet.backbones import BACKBONES

        BACKBONES.get(cfg.backbone)
        from repnet.backbones import create_backbone

        probe = create_backbone(cfg.backbone, pretrained=False)  # mean / std only
        mean, std = probe.mean, probe.std
    train_ds, val_ds, test_ds, num_classes, class_names = build_datasets(
        cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, mean=mean, std=std,
        val_fraction=cfg.val_fraction, seed=cfg.seed, download=cfg.download, train_subset=cfg.train_subset,
        test_subset=cfg.test_subset, augment=cfg.augment)
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None
    return train_ds, val_ds, test_ds, num_classes, class_names
