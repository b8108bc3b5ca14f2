"""What every dataset is made of: an image *source* and transformed *views* of it.

A source holds the raw images of one official split and their labels (:class:`ArraySource`: uint8
arrays in memory; :class:`FileSource`: ``(path, label)`` pairs read lazily). An :class:`ImageDataset`
is a torch ``Dataset`` over a subset of a source's indices with one transform: the training and the
validation split are two views of one source with disjoint indices, so no image is copied.
Unreadable images never stop training: :func:`scan_files` drops files PIL cannot open (counted in
``skipped``), and an image that still fails when decoded is replaced by the next readable image of
the same view (counted in ``load_failures``).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from repnet.errors import RepnetError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- sources
def check_labels(targets, num_classes: int, where: str) -> None:
    """Every label is a class index (0 .. num_classes - 1); else one line naming the first one that is not."""
    targets = np.asarray(targets)
    bad = targets[(targets < 0) | (targets >= num_classes)] if targets.size else targets
    if bad.size:
        raise RepnetError(f"{where}: label {int(bad[0])} is outside 0..{num_classes - 1} ({num_classes} classes): "
                          "damaged or mislabelled data")


class ArraySource:
    """In-memory uint8 images ``(N, H, W)`` (greyscale) or ``(N, H, W, 3)`` (RGB) with labels."""

    skipped = 0
    skipped_files: tuple = ()

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str], where: str = "images"):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"ArraySource wants uint8 (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        check_labels(self.targets, len(self.classes), where)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def describe(self, i: int) -> str:
        return f"array image {i}"


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. High-depth images (16-bit grey ``I;16``, 32-bit ``I`` / ``F``) are scaled from
    their type's range to 0..255; PIL's ``convert`` would clip every value above 255 to white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else top
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return im.convert("RGB")


class FileSource:
    """Image files read lazily: ``samples`` is a list of ``(path, label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 skipped_files: Sequence[tuple[str, str]] = ()):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = np.asarray([y for _, y in self.samples], dtype=np.int64)
        self.classes = list(classes)
        self.skipped_files = list(skipped_files)  # (path, reason) dropped when scanned
        check_labels(self.targets, len(self.classes), f"image list ({len(self.samples)} files)")

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        with Image.open(self.samples[i][0]) as im:
            return to_rgb(im)  # decodes the whole file: corrupt data fails here

    def describe(self, i: int) -> str:
        return self.samples[i][0]


def _verify_one(path: str) -> str | None:
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def scan_files(samples: Sequence[tuple[str, int]], classes: Sequence[str], verify: bool = True,
               where: str = "") -> FileSource:
    """Build a :class:`FileSource`, dropping (and counting) files that are missing or unreadable.

    With ``verify`` each file is opened and ``PIL.Image.verify()``-ed (header and, for PNG, chunk
    checksums); without it only existence is checked. Images that pass but still fail to decode
    are handled when loaded (see :class:`ImageDataset`).
    """
    paths = [str(p) for p, _ in samples]
    if verify:
        workers = min(8, os.cpu_count() or 1) if len(paths) > 2000 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as ex:
                reasons = list(ex.map(_verify_one, paths, chunksize=256))
        else:
            reasons = [_verify_one(p) for p in paths]
    else:
        reasons = [None if os.path.isfile(p) else "file not found" for p in paths]
    good = [(p, int(y)) for (p, y), r in zip(samples, reasons) if r is None]
    bad = [(str(p), r) for (p, _), r in zip(samples, reasons) if r is not None]
    if bad:
        log.warning("skipped %d unreadable image(s)%s (first: %s: %s)", len(bad),
                    f" in {where}" if where else "", bad[0][0], bad[0][1])
    return FileSource(good, classes, bad)


# ----------------------------------------------------------------------------- splits
def _class_indices(targets: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(targets == c) for c in np.unique(targets)]


def stratified_split(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class into ``(kept, held_out)``; ``held_out`` has ~``fraction`` of each class.

    Deterministic for a given ``seed``. Every class with >= 2 images gets at least one held-out
    image when ``fraction > 0``, and every class keeps at least one image.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for idx in _class_indices(targets):
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            k = max(k, 1)
        k = min(k, len(idx) - 1)
        held.append(idx[:k])
        kept.append(idx[k:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(kept), cat(held)


def stratified_sample(targets: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """``n`` positions of ``targets`` with class proportions kept (largest remainder), sorted."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    groups = _class_indices(targets)
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    picked = [g[rng.permutation(len(g))[:k]] for g, k in zip(groups, take)]
    return np.sort(np.concatenate(picked))


# ----------------------------------------------------------------------------- the torch Dataset
class ImageDataset(Dataset):
    """A transformed view of part of a source; items are ``(image_tensor, label)``.

    Attributes: ``indices`` (into the source), ``targets`` (labels of this view), ``classes``,
    ``num_classes``, ``skipped`` (images dropped when scanned + images that failed to decode here).
    """

    def __init__(self, source, indices: Sequence[int] | None = None, transform: Callable | None = None,
                 name: str = ""):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.name = name
        self.load_failures: list[tuple[str, str]] = []  # per process (each DataLoader worker counts its own)

    # -- info
    @property
    def targets(self) -> np.ndarray:
        return self.source.targets[self.indices]

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    @property
    def skipped(self) -> int:
        return self.source.skipped + len(self.load_failures)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=self.num_classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name or 'images'}: {len(self)} images, {self.num_classes} classes"
                f"{f', {self.skipped} skipped' if self.skipped else ''})")

    # -- derived views
    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """A stratified subset of ``n`` images (deterministic for ``seed``); same transform."""
        if n is None or n >= len(self):
            return self.view(self.indices)
        if n <= 0:
            raise RepnetError(f"subset size must be positive, got {n}")
        return self.view(self.indices[stratified_sample(self.targets, n, seed)])

    def view(self, indices: Sequence[int], transform: Callable | None = ...) -> "ImageDataset":
        """Another view of the same source (indices into the source), by default with this transform."""
        tf = self.transform if transform is ... else transform
        return ImageDataset(self.source, indices, tf, self.name)

    def with_transform(self, transform: Callable | None) -> "ImageDataset":
        return self.view(self.indices, transform)

    # -- items
    def __getitem__(self, k: int):
        n = len(self.indices)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"index {k} out of range for {n} images")
        for step in range(n):
            i = int(self.indices[(k + step) % n])
            try:
                img = self.source.load(i)
            except Exception as e:  # noqa: BLE001 - a corrupt file must not stop training
                what = self.source.describe(i)
                if not any(p == what for p, _ in self.load_failures):
                    self.load_failures.append((what, f"{type(e).__name__}: {e}"))
                    log.warning("could not decode %s (%s: %s); using the next image instead",
                                what, type(e).__name__, e)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, int(self.source.targets[i])
        raise RepnetError(f"no readable image in dataset {self.name or ''} ({n} files failed to decode)")
