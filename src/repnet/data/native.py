"""The paper's datasets in their own (native, as-downloaded) on-disk formats.

``root`` is the folder that *contains* the native folder (as in torchvision), e.g.
``root/cifar-10-batches-py``. Each reader returns ``(train, test)`` views on the official split.
Stanford Cars, Oxford-IIIT Pets, FGVC Aircraft and Food-101: torchvision's classes parse the files and
we take their file lists, so every image goes through the same corrupt-file scan as an ImageFolder.
CIFAR-10/100 and Flowers102: torchvision refuses files whose MD5 differs from the originals, so we read
the same files directly (CIFAR's pickles through the restricted unpickler). CUB-200-2011: no
torchvision class; we parse its index files and ``images/`` tree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from repnet.errors import RepnetError
from repnet.storage import restricted_unpickle
from repnet.data.core import ArraySource, ImageDataset, check_labels, scan_files


class NativeFormat:
    """One native format: the folder it lives in, how to read it, how to download it."""

    def __init__(self, folder: str, read: Callable, download: Callable | None, describe: str):
        self.folder = folder          # e.g. "cifar-10-batches-py"
        self.read = read              # (root, verify) -> (train, test)
        self.download = download      # (root) -> None, or None when it cannot be downloaded
        self.describe = describe      # what the user should have on disk

    def find(self, root: Path) -> Path | None:
        """The folder containing ``self.folder`` (``root`` itself, or its parent if the user pointed inside)."""
        if (root / self.folder).is_dir():
            return root
        if root.name == self.folder and root.is_dir():
            return root.parent
        return None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise RepnetError(f"{what}: '{path}' is missing")
    return path


# ----------------------------------------------------------------------------- CIFAR
_CIFAR = {
    10: dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
             meta="batches.meta", label_key="labels", names_key="label_names", tv="CIFAR10"),
    100: dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
              label_key="fine_labels", names_key="fine_label_names", tv="CIFAR100"),
}


def _unpickle(path: Path) -> dict:
    """A CIFAR python batch: a pickle, read with the restricted unpickler (plain data only)."""
    _require(path, "CIFAR file")
    entry = restricted_unpickle(path, "CIFAR file")
    if not isinstance(entry, dict):
        raise RepnetError(f"CIFAR file '{path}' does not hold a CIFAR batch (a dict)")
    return entry


def read_cifar(root: Path, which: int) -> tuple[ImageDataset, ImageDataset]:
    spec = _CIFAR[which]
    base = root / spec["folder"]
    meta = _unpickle(base / spec["meta"])
    if spec["names_key"] not in meta:
        raise RepnetError(f"CIFAR file '{base / spec['meta']}' has no '{spec['names_key']}' entry")
    classes = [str(c) for c in meta[spec["names_key"]]]

    def read(files: list[str]) -> ArraySource:
        xs, ys = [], []
        for name in files:
            entry = _unpickle(base / name)
            try:
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = [int(y) for y in entry[spec["label_key"]]]
            except (KeyError, ValueError, TypeError) as e:
                raise RepnetError(f"CIFAR file '{base / name}' is malformed ({type(e).__name__}: {e})") from e
            if len(labels) != len(data):
                raise RepnetError(f"CIFAR file '{base / name}' has {len(data)} images but {len(labels)} labels")
            check_labels(labels, len(classes), f"CIFAR file '{base / name}'")
            xs.append(data.transpose(0, 2, 3, 1))
            ys += labels
        return ArraySource(np.ascontiguousarray(np.concatenate(xs)), ys, classes)

    return ImageDataset(read(spec["train"]), name=f"cifar{which}/train"), \
        ImageDataset(read(spec["test"]), name=f"cifar{which}/test")


def _download_tv(cls_name: str, **kw) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        try:
            getattr(tvd, cls_name)(str(root), download=True, **kw)
        except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
            raise RepnetError(f"could not download {cls_name} into '{root}': {type(e).__name__}: {e}") from e
    return download


# ----------------------------------------------------------------------------- Flowers102
def read_flowers102(root: Path, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    from scipy.io import loadmat

    base = root / "flowers-102"
    images = _require(base / "jpg", "Flowers102 image folder")
    try:
        labels = np.asarray(loadmat(_require(base / "imagelabels.mat", "Flowers102 labels"),
                                    squeeze_me=True)["labels"]).reshape(-1).astype(np.int64) - 1
        setid = loadmat(_require(base / "setid.mat", "Flowers102 splits"), squeeze_me=True)
        ids = {k: np.asarray(setid[k]).reshape(-1).astype(np.int64) for k in ("trnid", "valid", "tstid")}
    except RepnetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RepnetError(f"Flowers102 .mat files in '{base}' are unreadable ({type(e).__name__}: {e})") from e
    classes = [str(i + 1) for i in range(int(labels.max()) + 1)]

    def files(image_ids):
        return [(str(images / f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in image_ids]

    # TinyTL / the paper train on train+val (2,040 images) and test on the 6,149 test images
    train = scan_files(files(np.concatenate([ids["trnid"], ids["valid"]])), classes, verify, str(images))
    test = scan_files(files(ids["tstid"]), classes, verify, str(images))
    return ImageDataset(train, name="flowers102/train"), ImageDataset(test, name="flowers102/test")


# ----------------------------------------------------------------------------- torchvision-parsed
def _tv_samples(ds) -> list[tuple[str, int]]:
    if hasattr(ds, "_samples"):
        return [(str(p), int(y)) for p, y in ds._samples]
    for attr in ("_image_files", "_images"):
        if hasattr(ds, attr) and hasattr(ds, "_labels"):
            return [(str(p), int(y)) for p, y in zip(getattr(ds, attr), ds._labels)]
    raise RepnetError(f"this torchvision version's {type(ds).__name__} exposes no file list; "
                      f"use the ImageFolder layout (<root>/train/<class>, <root>/val/<class>) instead")


def _read_tv(cls_name: str, train_split: str, test_split: str, name: str, **kw):
    def read(root: Path, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
        import torchvision.datasets as tvd

        out = []
        classes = None
        for split in (train_split, test_split):
            try:
                ds = getattr(tvd, cls_name)(str(root), split=split, **kw)
            except Exception as e:  # noqa: BLE001 - missing files, malformed .mat/.json/.txt: one line
                raise RepnetError(f"torchvision {cls_name} could not read '{root}' (split '{split}'): "
                                  f"{type(e).__name__}: {e}") from e
            classes = classes or [str(c) for c in ds.classes]
            src = scan_files(_tv_samples(ds), classes, verify, f"{root} ({split})")
            out.append(ImageDataset(src, name=f"{name}/{split}"))
        return out[0], out[1]
    return read


# ----------------------------------------------------------------------------- CUB-200-2011
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"


def _read_table(path: Path) -> dict[int, str]:
    _require(path, "CUB-200-2011 file")
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, _, value = line.strip().partition(" ")
            try:
                out[int(key)] = value.strip()
            except ValueError:
                raise RepnetError(f"{path}:{n}: expected '<id> <value>', got {line.strip()!r}") from None
            if not out[int(key)]:
                raise RepnetError(f"{path}:{n}: expected '<id> <value>', got {line.strip()!r}")
    return out


def read_cub200(root: Path, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    base = root / "CUB_200_2011"
    images_dir = _require(base / "images", "CUB-200-2011 image folder")
    paths = _read_table(base / "images.txt")
    labels = _read_table(base / "image_class_labels.txt")
    is_train = _read_table(base / "train_test_split.txt")
    try:
        label_of = {i: int(v) - 1 for i, v in labels.items()}
        train_of = {i: int(v) == 1 for i, v in is_train.items()}
    except ValueError as e:
        raise RepnetError(f"CUB-200-2011 label/split files in '{base}' hold a non-integer value ({e})") from e
    missing = [i for i in paths if i not in label_of or i not in train_of]
    if missing:
        raise RepnetError(f"CUB-200-2011 image id {missing[0]} of images.txt has no label or split entry in '{base}'")
    if (base / "classes.txt").is_file():
        names = _read_table(base / "classes.txt")
        classes = [names[k] for k in sorted(names)]
    else:  # the class folder names, e.g. "001.Black_footed_Albatross"
        folder_of = {label_of[i]: p.split("/")[0] for i, p in paths.items()}
        classes = [folder_of.get(c, str(c + 1)) for c in range(max(label_of.values()) + 1)]
    split = {True: [], False: []}
    for i in sorted(paths):
        split[train_of[i]].append((str(images_dir / paths[i]), label_of[i]))
    train = scan_files(split[True], classes, verify, str(images_dir))
    test = scan_files(split[False], classes, verify, str(images_dir))
    return ImageDataset(train, name="cub200/train"), ImageDataset(test, name="cub200/test")


def download_cub200(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CUB_URL, str(root), filename="CUB_200_2011.tgz", md5=CUB_MD5)
    except Exception as e:  # noqa: BLE001
        raise RepnetError(f"could not download CUB-200-2011 into '{root}': {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- the table
NATIVE_FORMATS: dict[str, NativeFormat] = {
    "cifar10": NativeFormat("cifar-10-batches-py", lambda root, verify=True: read_cifar(root, 10),
                            _download_tv("CIFAR10", train=True),
                            "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"),
    "cifar100": NativeFormat("cifar-100-python", lambda root, verify=True: read_cifar(root, 100),
                             _download_tv("CIFAR100", train=True), "cifar-100-python/ (train, test, meta)"),
    "flowers102": NativeFormat("flowers-102", read_flowers102, _download_tv("Flowers102"),
                               "flowers-102/ (jpg/, imagelabels.mat, setid.mat)"),
    "cars": NativeFormat("stanford_cars", _read_tv("StanfordCars", "train", "test", "cars"), None,
                         "stanford_cars/ (devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat)"),
    "pets": NativeFormat("oxford-iiit-pet", _read_tv("OxfordIIITPet", "trainval", "test", "pets"),
                         _download_tv("OxfordIIITPet"), "oxford-iiit-pet/ (images/, annotations/)"),
    "aircraft": NativeFormat("fgvc-aircraft-2013b",
                             _read_tv("FGVCAircraft", "trainval", "test", "aircraft", annotation_level="variant"),
                             _download_tv("FGVCAircraft"),
                             "fgvc-aircraft-2013b/ (data/images/, data/variants.txt, ...)"),
    "food101": NativeFormat("food-101", _read_tv("Food101", "train", "test", "food101"), _download_tv("Food101"),
                            "food-101/ (images/, meta/train.json, meta/test.json)"),
    "cub200": NativeFormat("CUB_200_2011", read_cub200, download_cub200,
                           "CUB_200_2011/ (images/, images.txt, image_class_labels.txt, train_test_split.txt)"),
}
