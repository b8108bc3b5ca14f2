"""Class-per-folder image trees (torchvision ImageFolder semantics, with checks and corrupt-file skipping).

Two layouts:

* split:  ``<root>/train/<class>/*.jpg`` + ``<root>/val/<class>/*.jpg`` (or ``test/``). This is the
  TinyTL layout of the paper's datasets, where ``val/`` holds the *official test split*; our own
  validation split is then held out of ``train/`` by :func:`repnet.data.build_datasets`.
* single: ``<root>/<class>/*.jpg``, split deterministically (stratified, fixed seed 0, 20 % test)
  into train and test, so the test images never depend on the run's seed.
"""
from __future__ import annotations

import os
from pathlib import Path

from repnet.errors import RepnetError
from repnet.data.core import IMG_EXTENSIONS, ImageDataset, scan_files, stratified_split

SINGLE_FOLDER_TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: official-less train/test splits must not move with the run's seed
TEST_DIR_NAMES = ("val", "test")
_EXT_HINT = ", ".join(IMG_EXTENSIONS[:3]) + ", ..."


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path, root: Path | None = None) -> list[str]:
    """Image files under ``folder``. Symlinked folders are followed, but each real folder is
    visited once: a link back up the tree (a loop), or to a folder that the scan of ``root``
    reaches anyway (e.g. another class's folder), is not walked, so no image is read twice or
    under another class's label."""
    inside = os.path.realpath(root if root is not None else folder)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if target in seen or target == inside or target.startswith(inside + os.sep):
                    continue
            keep.append(d)
        dirnames[:] = keep
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return out


def _loose_hint(folder: Path) -> str:
    loose = any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(folder))
    return " (found images there: they must sit in one subfolder per class)" if loose else ""


def check_root(root: str | os.PathLike, what: str = "data root") -> Path:
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        raise RepnetError(f"{what} '{path}' does not exist")
    if not path.is_dir():
        raise RepnetError(f"{what} '{path}' is not a folder")
    return path


def scan_class_folders(folder: Path, classes: list[str] | None = None, verify: bool = True) -> ImageDataset:
    """Read ``folder/<class>/**/<image>``; ``classes`` fixes the label order (a test folder reuses train's)."""
    names = _subdirs(folder)
    if not names:
        raise RepnetError(f"no class subfolders in '{folder}': expected '{folder}/<class>/*.jpg'{_loose_hint(folder)}")
    if classes is None:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in names:
        if name not in index:
            raise RepnetError(f"class folder '{folder / name}' has no matching class folder in the training "
                              f"data (training classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        files = _images_under(folder / name, root=folder)
        if not files:
            raise RepnetError(f"class folder '{folder / name}' has no images (expected files ending in {_EXT_HINT})")
        samples += [(f, index[name]) for f in files]
    source = scan_files(samples, classes, verify=verify, where=str(folder))
    present = set(source.targets.tolist())
    for name in names:
        if index[name] not in present:
            raise RepnetError(f"class folder '{folder / name}' has no readable images "
                              f"(all {sum(y == index[name] for _, y in samples)} failed to open)")
    return ImageDataset(source, name=str(folder))


def find_test_dir(root: Path) -> Path | None:
    for name in TEST_DIR_NAMES:
        if (root / name).is_dir():
            return root / name
    return None


def load_split_folders(root: Path, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """``root/train/<class>`` + ``root/val|test/<class>`` -> (train, test) views (no transforms)."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise RepnetError(f"no 'train' folder in '{root}': expected '{root}/train/<class>/*.jpg' "
                          f"and '{root}/val/<class>/*.jpg'")
    test_dir = find_test_dir(root)
    if test_dir is None:
        raise RepnetError(f"'{train_dir}' found but no 'val' or 'test' folder beside it: expected "
                          f"'{root}/val/<class>/*.jpg' (the test split)")
    train = scan_class_folders(train_dir, verify=verify)
    test = scan_class_folders(test_dir, classes=train.classes, verify=verify)
    return train, test


def load_imagefolder(path: str | os.PathLike, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Either layout (see the module docstring) -> (train, test) views (no transforms)."""
    root = check_root(path, "image folder")
    if (root / "train").is_dir():
        return load_split_folders(root, verify)
    if find_test_dir(root) is not None:  # val/ or test/ without train/: not a class folder
        return load_split_folders(root, verify)  # raises the "no 'train' folder" error
    if not _subdirs(root):
        raise RepnetError(f"no class subfolders in '{root}': expected '{root}/train/<class>/*.jpg' + "
                          f"'{root}/val/<class>/*.jpg', or '{root}/<class>/*.jpg'{_loose_hint(root)}")
    everything = scan_class_folders(root, verify=verify)
    train_idx, test_idx = stratified_split(everything.targets, SINGLE_FOLDER_TEST_FRACTION, SPLIT_SEED)
    return everything.view(train_idx), everything.view(test_idx)
