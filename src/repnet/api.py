"""The public entry points (PEFT-like): ``get_model``, ``from_pretrained``.

``get_model`` is the one place a model is made - training, continual tasks, federated clients,
profiling and loading all build through it: a frozen backbone, the method's modules, a new head, the
memory engine swapped in, and the construction options (INT8 training, 8-bit frozen weights) applied
and recorded in ``model.config()``. ``from_pretrained`` rebuilds a saved adapter on its own backbone
and refuses other backbone weights in one line.
"""
from __future__ import annotations

import dataclasses
import os


from repnet.backbones import Backbone, create_backbone
from repnet.errors import RepnetError
from repnet.limits import MAX_IMAGE_SIZE, MAX_NUM_CLASSES, check_int
from repnet.storage import Spec, check_fields, non_finite, read_json, read_safetensors
from repnet.methods import METHODS, TransferModel, parse_options

MEMORY_MODES = ("engine", "vanilla")


def get_model(
    backbone: "str | Backbone",
    method: str,
    num_classes: int,
    image_size: int = 224,
    pretrained=True,
    memory: str = "engine",
    int8: dict | bool | None = None,
    frozen_bits: str | None = None,
    **options,
) -> TransferModel:
    """Build ``method`` on a frozen ``backbone`` with a new ``num_classes``-way head: the one
    place a model is made (training, continual tasks, federated clients, profiling, loading).

    ``backbone``: a registered name, or an existing :class:`~repnet.backbones.Backbone` to build
    on (continual learning shares one). ``pretrained``: True (offline ImageNet weights where
    packaged), False (random init), or a checkpoint path / URL (ignored for a backbone object).
    Construction options, recorded in ``model.config()`` and restored by :func:`from_pretrained`:

    * ``memory``: ``engine`` (default; frozen layers keep nothing for backward) or ``vanilla``
      (plain PyTorch, for comparison);
    * ``int8``: INT8 training of the side network (``True`` or :class:`repnet.memory.int8.Int8Config`
      fields, e.g. ``{"rounding": "nearest", "master": "int8"}``); implies 8-bit frozen weights;
    * ``frozen_bits``: store the frozen backbone's conv / linear weights in 8 bits (``linear``
      per-channel, or the paper's ``kmeans``) without INT8 training.

    ``options`` are the method's options (see ``repnet list -v`` / the method's ``Options``).
    """
    cls = METHODS.get(method)
    if memory not in MEMORY_MODES:
        raise RepnetError(f"unknown memory mode '{memory}'; choose from: {', '.join(MEMORY_MODES)}")
    check_int("num_classes", num_classes, 1, MAX_NUM_CLASSES)
    check_int("image_size", image_size, 32, MAX_IMAGE_SIZE)
    opts = parse_options(cls.Options, options, method)
    net = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, pretrained)
    model = cls(net, int(num_classes), int(image_size), opts)
    if isinstance(backbone, Backbone):  # built on a shared backbone: same device and dtype
        ref = next(net.parameters())
        model.to(device=ref.device, dtype=ref.dtype)
    model.memory_mode = memory
    if memory == "engine":
        from repnet.memory import apply_engine

        apply_engine(model)
    if frozen_bits:
        from repnet.memory import quantize_frozen_weights

        quantize_frozen_weights(model, frozen_bits, engine=memory == "engine")
        model.frozen_bits = frozen_bits
    if int8:
        from repnet.memory.int8 import Int8Config, enable_int8_training

        settings = {} if int8 is True else dict(int8) if isinstance(int8, dict) else None
        known = {f.name: f.type for f in dataclasses.fields(Int8Config)}
        if settings is None or set(settings) - set(known) or any(
                not isinstance(v, bool if known[k] in (bool, "bool") else str) for k, v in settings.items()):
            raise RepnetError(f"int8={int8!r}: expected true or a mapping of {', '.join(known)} (bools / names)")
        enable_int8_training(model, **settings)
    return model


#: What an adapter's ``config.json`` holds (``TransferModel.config()``), field by field: checked on load.
ADAPTER_FIELDS = {
    "backbone": str, "method": str, "backbone_fingerprint": str, "options": dict,
    "num_classes": Spec(int, low=1, high=MAX_NUM_CLASSES), "image_size": Spec(int, low=32, high=MAX_IMAGE_SIZE),
    "backbone_weights": Spec(str, None, required=False), "repnet_version": Spec(str, None, required=False),
    "memory": Spec(str, choices=MEMORY_MODES, required=False),
    "int8": Spec(dict, None, required=False), "frozen_bits": Spec(str, None, required=False),
}


def from_pretrained(directory: str, backbone=None, pretrained=True, memory: str | None = None) -> TransferModel:
    """Rebuild a model saved by ``save_pretrained``.

    The frozen backbone is rebuilt from ``pretrained`` (default: the offline weights) and must
    be the one the adapter was trained on (same name and weight fingerprint), else a clear error.
    """
    cfg_path = os.path.join(directory, "config.json")
    st_path = os.path.join(directory, "adapter.safetensors")
    if not os.path.isfile(cfg_path) or not os.path.isfile(st_path):
        raise RepnetError(f"{directory} is not a saved repnet adapter (expected config.json and adapter.safetensors)")
    cfg = check_fields(read_json(cfg_path, "adapter config"), ADAPTER_FIELDS, f"adapter config {cfg_path}")
    stored = read_safetensors(st_path, "adapter", require_digest=True)  # damaged: refused before any build
    bad = non_finite(stored)
    if bad is not None:
        raise RepnetError(f"adapter {st_path} holds non-finite values ({bad}: NaN / inf): not a usable model")
    if backbone is not None and backbone != cfg["backbone"]:
        raise RepnetError(
            f"adapter in {directory} was trained on backbone '{cfg['backbone']}', not '{backbone}'"
        )
    if pretrained is True:
        recorded = cfg.get("backbone_weights")
        if recorded is None:
            pretrained = False  # trained on a randomly initialised backbone (tests, profiling)
        elif os.path.isfile(recorded):
            pretrained = recorded  # the very file it was trained on
    model = get_model(cfg["backbone"], cfg["method"], cfg["num_classes"], cfg["image_size"],
                      pretrained=pretrained, memory=memory or cfg.get("memory", "engine"), int8=cfg.get("int8"),
                      frozen_bits=cfg.get("frozen_bits"), **cfg["options"])
    if model.backbone.fingerprint != cfg["backbone_fingerprint"]:
        raise RepnetError(
            f"backbone weights do not match the adapter in {directory}: it was trained on {cfg['backbone']} "
            f"with weights fingerprint {cfg['backbone_fingerprint']}, these weights have {model.backbone.fingerprint}"
        )
    from repnet.memory.int8 import unpack_on_grid

    tensors = unpack_on_grid(stored)
    expected = set(model.trainable_state_keys())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise RepnetError(f"adapter in {directory} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
    own = model.state_dict()
    wrong = [k for k in tensors if tuple(tensors[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise RepnetError(f"adapter in {directory} does not fit its own config: {k} has shape {tuple(tensors[k].shape)}, "
                          f"the model built from config.json expects {tuple(own[k].shape)} (a damaged or edited adapter)")
    model.load_state_dict(tensors, strict=False)
    return model
