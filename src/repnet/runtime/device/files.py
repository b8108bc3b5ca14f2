"""What ``repnet-device`` (the C++ trainer in ``device/``) reads: a training program with its
metadata, and packed datasets. The formats are documented in ``docs/device.md``.

* ``<name>.pte`` + ``<name>.json``: :func:`write_program` - the ExecuTorch training program (methods
  ``forward``: the joint forward + backward, ``evaluate``: logits only) and what the device needs
  beside it: the trained tensors in program order with their parameter group and learning rate, the
  optimizer and schedule of the recipe, image size, normalisation, class names, the program's
  planned memory, and the adapter's ``config.json``, so the device writes an adapter folder that
  :func:`repnet.from_pretrained` loads.
* ``<split>.rpd``: :func:`write_dataset` - preprocessed images (float32, normalised, C x H x W) and
  labels behind a fixed 96-byte header (:data:`DATASET_MAGIC`, version, count, C/H/W, dtype, class
  count, flags, SHA-256 of the payload); the device reads it one batch at a time (``pread``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from repnet.errors import RepnetError
from repnet.storage import atomic_write, atomic_write_bytes, atomic_write_text
from repnet.optim import CosineSchedule

__all__ = ["PROGRAM_FORMAT", "PROGRAM_VERSION", "DATASET_MAGIC", "DATASET_VERSION", "DATASET_HEADER_BYTES",
           "write_program", "program_metadata", "write_dataset", "read_dataset", "read_dataset_header",
           "optimizer_spec", "flips_of", "device_epoch_order", "cosine_factor"]

PROGRAM_FORMAT = "repnet-device-program"
PROGRAM_VERSION = 1
DATASET_MAGIC = b"RPNDATA\x00"
DATASET_VERSION = 1
DATASET_HEADER_BYTES = 96
DTYPE_FLOAT32 = 1
FLAG_HFLIP = 1
_HEADER = struct.Struct("<8sIIQIIIIII32s16s")  # magic, version, header bytes, count, C, H, W, dtype, classes,
#                                                flags, sha256(payload), reserved
assert _HEADER.size == DATASET_HEADER_BYTES


# ----------------------------------------------------------------------------- programs
def optimizer_spec(cfg) -> dict:
    """The optimizer of ``cfg`` (a TrainConfig) as the device runs it: ``adam`` is torch.optim.Adam
    (weight decay added to the gradient; = AdamW when weight_decay is 0, as in the recipes), ``adamw``
    decoupled weight decay (torch.optim.AdamW), ``sgd`` torch.optim.SGD with momentum 0.9 (as
    :func:`repnet.training.loop.make_optimizer` builds them)."""
    if cfg.optimizer in ("adam", "adamw"):
        return {"name": cfg.optimizer, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": float(cfg.weight_decay)}
    if cfg.optimizer == "sgd":
        return {"name": "sgd", "momentum": 0.9, "dampening": 0.0, "nesterov": False,
                "weight_decay": float(cfg.weight_decay)}
    raise RepnetError(f"optimizer {cfg.optimizer!r} is not supported by the device trainer (adam, adamw, sgd)")


def flips_of(cfg) -> bool:
    """Whether training on ``cfg`` flips images horizontally (the device's only augmentation)."""
    from repnet.data.datasets import dataset_info

    if cfg.augment == "none":
        return False
    return bool(dataset_info(cfg.dataset).hflip)


def program_metadata(model, program, *, lr: float, lr_side: float, optimizer: dict, total_steps: int,
                     warmup_steps: int = 0, schedule: str = "cosine", clip_grad_norm: float | None = None,
                     label_smoothing: float = 0.0, class_names=None, mean=None, std=None,
                     pte_name: str = "program.pte") -> dict:
    """The metadata of ``program`` (a :class:`~repnet.runtime.executorch.program.TrainingProgram` of ``model``
    exported with ``evaluate=True``)."""
    extra = sorted(set(model.trainable_state_keys()) - set(program.trainable))
    if extra:
        raise RepnetError(f"the device trainer cannot save {extra[:3]}: the adapter holds tensors the program does "
                          "not train")
    groups = model.param_groups(lr, lr_side)
    group_of = {id(p): (g.get("name", f"group{i}"), g["lr"]) for i, g in enumerate(groups) for p in g["params"]}
    trainable = []
    for name in program.trainable:
        p = model.get_parameter(name)
        group, group_lr = group_of.get(id(p), ("head+backbone", lr))
        trainable.append({"name": name, "shape": list(p.shape), "dtype": "float32", "group": group,
                          "lr": float(group_lr)})
    if schedule not in ("cosine", "constant"):
        raise RepnetError(f"schedule {schedule!r} is not supported by the device trainer (cosine, constant)")
    return {
        "format": PROGRAM_FORMAT, "version": PROGRAM_VERSION,
        "program": {"file": pte_name, "sha256": hashlib.sha256(program.buffer).hexdigest(),
                    "bytes": len(program.buffer), "train_method": "forward", "eval_method": "evaluate"},
        "batch_size": program.batch_size, "image_size": program.image_size, "channels": 3,
        "num_classes": int(model.num_classes),
        "class_names": [str(c) for c in class_names] if class_names is not None else
        [str(i) for i in range(model.num_classes)],
        "mean": [float(v) for v in (mean if mean is not None else model.backbone.mean)],
        "std": [float(v) for v in (std if std is not None else model.backbone.std)],
        "label_smoothing": float(label_smoothing),
        "trainable": trainable,
        "groups": [{"name": g.get("name", f"group{i}"), "lr": float(g["lr"])} for i, g in enumerate(groups)],
        "optimizer": optimizer,
        "schedule": {"name": schedule, "total_steps": int(total_steps), "warmup_steps": int(warmup_steps)},
        "clip_grad_norm": None if clip_grad_norm is None else float(clip_grad_norm),
        "memory": {"planned_bytes": int(program.planned_bytes), "arena_bytes": int(program.arena_bytes),
                   "weights_bytes": int(program.weights_bytes), "eval_arena_bytes": int(program.eval_arena_bytes),
                   "program_bytes": len(program.buffer)},
        "rewrites": program.rewrites,
        "adapter_config": model.config(),
    }


def write_program(folder: str | os.PathLike, program, metadata: dict, name: str = "program") -> tuple[Path, Path]:
    """Write ``<folder>/<name>.pte`` and ``<name>.json`` atomically; returns both paths."""
    folder = Path(folder)
    pte, meta = folder / f"{name}.pte", folder / f"{name}.json"
    metadata = {**metadata, "program": {**metadata["program"], "file": pte.name}}
    atomic_write_bytes(pte, program.buffer)
    atomic_write_text(meta, json.dumps(metadata, indent=2) + "\n")
    return pte, meta


# ----------------------------------------------------------------------------- datasets
def write_dataset(dataset, path: str | os.PathLike, num_classes: int, hflip: bool = False,
                  batch: int = 256) -> dict:
    """Pack ``dataset`` (items ``(image C x H x W float tensor, label)``, already preprocessed) into
    ``path`` atomically, streaming (one ``batch`` of images in memory); returns the header fields."""
    n = len(dataset)
    if n < 1:
        raise RepnetError(f"cannot pack an empty dataset into {path}")
    first = dataset[0][0]
    if first.ndim != 3:
        raise RepnetError(f"dataset images must be C x H x W tensors, got shape {tuple(first.shape)}")
    c, h, w = (int(v) for v in first.shape)
    out: dict = {}

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        labels = np.empty(n, dtype="<i4")
        with open(tmp, "wb") as f:
            f.write(b"\0" * DATASET_HEADER_BYTES)
            f.write(b"\0" * (4 * n))  # labels, filled in below
            for start in range(0, n, batch):
                chunk = []
                for i in range(start, min(n, start + batch)):
                    img, label = dataset[i]
                    img = torch.as_tensor(img, dtype=torch.float32)
                    if tuple(img.shape) != (c, h, w):
                        raise RepnetError(f"image {i} has shape {tuple(img.shape)}, the first one {(c, h, w)}")
                    label = int(label)
                    if not 0 <= label < num_classes:
                        raise RepnetError(f"label {label} of image {i} is outside 0 .. {num_classes - 1}")
                    labels[i] = label
                    chunk.append(img.contiguous().numpy().astype("<f4", copy=False))
                data = np.stack(chunk).tobytes()
                f.write(data)
            f.seek(DATASET_HEADER_BYTES)
            f.write(labels.tobytes())
        digest.update(labels.tobytes())
        with open(tmp, "rb") as f:  # the checksum of the payload as written (labels, then images)
            f.seek(DATASET_HEADER_BYTES + 4 * n)
            while block := f.read(1 << 20):
                digest.update(block)
        header = _HEADER.pack(DATASET_MAGIC, DATASET_VERSION, DATASET_HEADER_BYTES, n, c, h, w, DTYPE_FLOAT32,
                              int(num_classes), FLAG_HFLIP if hflip else 0, digest.digest(), b"\0" * 16)
        with open(tmp, "rb+") as f:
            f.write(header)
        out.update(count=n, channels=c, height=h, width=w, num_classes=int(num_classes), hflip=bool(hflip),
                   sha256=digest.hexdigest())

    atomic_write(path, write)
    return out


def read_dataset_header(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(DATASET_HEADER_BYTES)
    except OSError as e:
        raise RepnetError(f"cannot read dataset {path}: {e.strerror or e}") from None
    if len(raw) < DATASET_HEADER_BYTES or raw[:8] != DATASET_MAGIC:
        raise RepnetError(f"{path} is not a repnet dataset file")
    magic, version, hb, n, c, h, w, dtype, classes, flags, sha, _ = _HEADER.unpack(raw)
    return {"version": version, "header_bytes": hb, "count": n, "channels": c, "height": h, "width": w,
            "dtype": dtype, "num_classes": classes, "hflip": bool(flags & FLAG_HFLIP), "sha256": sha.hex()}


def read_dataset(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, C, H, W)`` and labels ``(N,)`` of a packed file (tests; checksum checked)."""
    head = read_dataset_header(path)
    n, c, h, w = head["count"], head["channels"], head["height"], head["width"]
    raw = Path(path).read_bytes()
    payload = raw[DATASET_HEADER_BYTES:]
    if len(payload) != 4 * n + 4 * n * c * h * w or hashlib.sha256(payload).hexdigest() != head["sha256"]:
        raise RepnetError(f"dataset {path} is damaged (its size or checksum does not match its header)")
    labels = torch.from_numpy(np.frombuffer(payload[:4 * n], dtype="<i4").astype(np.int64))
    images = torch.from_numpy(np.frombuffer(payload[4 * n:], dtype="<f4").copy()).reshape(n, c, h, w)
    return images, labels


# ----------------------------------------------------------------------------- the device's data order
_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def device_epoch_order(seed: int, epoch: int, n: int) -> tuple[list[int], list[bool]]:
    """The order and flips ``repnet-device`` uses in ``epoch`` (docs/device.md), in plain Python:
    SplitMix64 from ``mix((mix(seed + G) ^ epoch) + G)``, Fisher-Yates with ``j = (next * (i + 1)) >> 64``;
    the image at position ``k`` is mirrored iff the top bit of ``mix(s_e ^ mix(k + G))`` is set."""
    s_e = _mix(((_mix((seed + _GAMMA) & _MASK) ^ epoch) + _GAMMA) & _MASK)
    state, order = s_e, list(range(n))
    for i in range(n - 1, 0, -1):
        state = (state + _GAMMA) & _MASK
        j = (_mix(state) * (i + 1)) >> 64
        order[i], order[j] = order[j], order[i]
    flips = [bool(_mix(s_e ^ _mix((k + _GAMMA) & _MASK)) >> 63) for k in range(n)]
    return order, flips


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The schedule factor the device applies at ``step`` (0-based): :class:`repnet.optim.CosineSchedule`'s."""
    return CosineSchedule(total_steps, warmup_steps)(step)
