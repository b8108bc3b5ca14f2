"""Datasets: offline real data, splits, transforms, native on-disk formats (tiny trees written here), errors."""
import gzip
import json
import logging
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from repnet.data import (DATASET_INFO, DATASETS, ImageDataset, build_datasets, build_transforms, dataset_info,
                         read_idx, stratified_sample, stratified_split)
from repnet.data.datasets import FASHION_MNIST_DIR
from repnet.errors import RepnetError

R = 16  # small image size keeps the tests fast
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FM_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz"]
HAVE_FM = all(os.path.isfile(os.path.join(FASHION_MNIST_DIR, f)) for f in FM_FILES)


def _img(path, rgb, size=8, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), tuple(rgb)).save(path, fmt)


def _image_tree(root, split_counts, classes=("cat", "dog", "fox"), ext=".png"):
    """root/<split>/<class>/<i><ext>, each class a distinct solid colour; returns the colours."""
    colours = {c: (40 * (i + 1), 200 - 50 * i, 30 + 60 * i) for i, c in enumerate(classes)}
    for split, n in split_counts.items():
        for c in classes:
            for i in range(n):
                _img(os.path.join(root, split, c, f"{i}{ext}") if split else os.path.join(root, c, f"{i}{ext}"),
                     colours[c])
    return colours


def _colour_label(ds, k):
    """Label of item k and the class whose colour the (untransformed) image has."""
    img, y = ds.with_transform(None)[k]
    return y, tuple(np.asarray(img)[0, 0])


# ----------------------------------------------------------------------------- offline real datasets
@pytest.mark.skipif(not HAVE_FM, reason=f"Debian dataset-fashion-mnist not installed ({FASHION_MNIST_DIR})")
def test_fashion_mnist_real_files():
    s = build_datasets("fashion_mnist", image_size=R, **HALF)
    assert s.num_classes == 10 and s.class_names[0] == "T-shirt/top" and s.class_names[9] == "Ankle boot"
    assert len(s.train) + len(s.val) == 60000 and len(s.test) == 10000
    assert len(s.val) == 6000 and (s.val.class_counts() == 600).all()
    assert (s.test.class_counts() == 1000).all()
    x, y = s.test[0]
    assert x.shape == (3, R, R) and x.dtype == torch.float32 and y == 9  # first t10k label is "Ankle boot"
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey -> 3 equal channels
    assert s.train.source.images.dtype == np.uint8 and s.train.source.images.shape == (60000, 28, 28)
    # the demo's subset: stratified, deterministic, val shrinks with it
    d = build_datasets("fashion_mnist", image_size=R, train_subset=2000, test_subset=500, seed=3)
    assert len(d.train) == 2000 and (d.train.class_counts() == 200).all()
    assert len(d.val) == 222 and len(d.test) == 500 and (d.test.class_counts() == 50).all()
    assert not set(d.train.indices) & set(d.val.indices)
    d2 = build_datasets("fashion_mnist", image_size=R, train_subset=2000, test_subset=500, seed=3)
    assert np.array_equal(d.train.indices, d2.train.indices) and np.array_equal(d.val.indices, d2.val.indices)


def test_mnist5k():
    s = build_datasets("mnist5k", image_size=R, **HALF)
    assert (s.num_classes, s.class_names) == (10, [str(i) for i in range(10)])
    assert len(s.train) == 3600 and len(s.val) == 400 and len(s.test) == 1000
    assert (s.test.class_counts() == 100).all() and (s.val.class_counts() == 40).all()
    x, y = s.train[0]
    assert x.shape == (3, R, R) and 0 <= y <= 9 and torch.equal(x[0], x[2])
    assert s.train.source.images.shape == (5000, 28, 28) and s.train.source.images.max() == 255
    # test split is fixed: it does not move with the run's seed, val does
    other = build_datasets("mnist5k", image_size=R, seed=1)
    assert np.array_equal(s.test.indices, other.test.indices)
    assert not np.array_equal(s.val.indices, other.val.indices)
    assert not set(s.test.indices) & (set(s.train.indices) | set(s.val.indices))


def test_digits_and_dataloader():
    s = build_datasets("digits", image_size=R, augment=False)
    total = len(s.train) + len(s.val) + len(s.test)
    assert total == 1797 and s.num_classes == 10
    assert abs(len(s.test) - 0.2 * 1797) <= 10
    assert s.train.source.images.shape == (1797, 8, 8) and s.train.source.images.max() == 255
    xb, yb = next(iter(torch.utils.data.DataLoader(s.train, batch_size=16, shuffle=True)))
    assert xb.shape == (16, 3, R, R) and yb.dtype == torch.int64
    # augment=False: training images get the deterministic test transform
    assert torch.equal(s.train[5][0], s.train[5][0])


# ----------------------------------------------------------------------------- splits
def test_val_split_disjoint_deterministic_stratified():
    targets = np.repeat(np.arange(5), [30, 20, 10, 5, 2])
    kept, held = stratified_split(targets, 0.1, seed=0)
    assert not set(kept) & set(held) and sorted([*kept, *held]) == list(range(len(targets)))
    assert np.bincount(targets[held]).tolist() == [3, 2, 1, 1, 1]  # every class represented
    k2, h2 = stratified_split(targets, 0.1, seed=0)
    assert np.array_equal(held, h2) and np.array_equal(kept, k2)
    assert not np.array_equal(held, stratified_split(targets, 0.1, seed=1)[1])
    sub = stratified_sample(targets, 20, seed=0)
    assert len(sub) == 20 and np.bincount(targets[sub]).tolist() == [9, 6, 3, 1, 1]
    assert np.array_equal(sub, stratified_sample(targets, 20, seed=0))


def test_val_uses_test_transform_and_no_val():
    s = build_datasets("digits", image_size=R)
    assert any(isinstance(t, T.RandomResizedCrop) for t in s.train.transform.transforms)
    assert not any(isinstance(t, T.RandomResizedCrop) for t in s.val.transform.transforms)
    assert s.val.transform is s.test.transform
    s0 = build_datasets("digits", image_size=R, val_fraction=0)
    assert s0.val is None and len(s0.train) + len(s0.test) == 1797
    with pytest.raises(RepnetError, match="val_fraction must be in"):
        build_datasets("digits", val_fraction=1.0)


# ----------------------------------------------------------------------------- transforms + presets
def test_transforms_follow_recipe():
    train, test = build_transforms(224, augment=True, color_jitter=True)
    kinds = [type(t) for t in train.transforms]
    rrc = next(t for t in train.transforms if isinstance(t, T.RandomResizedCrop))
    assert rrc.size == (224, 224) and rrc.scale == (0.22, 1.0)
    assert T.RandomHorizontalFlip in kinds and T.ColorJitter in kinds
    cj = next(t for t in train.transforms if isinstance(t, T.ColorJitter))
    assert cj.brightness == (0.6, 1.4) and cj.hue == (-0.1, 0.1)
    resize = next(t for t in test.transforms if isinstance(t, T.Resize))
    assert resize.size == math.ceil(224 / 0.875) == 256
    assert next(t for t in test.transforms if isinstance(t, T.CenterCrop)).size == (224, 224)
    norm = next(t for t in test.transforms if isinstance(t, T.Normalize))
    assert norm.mean == (0.485, 0.456, 0.406)
    plain, _ = build_transforms(224, augment=True, color_jitter=False)
    assert T.ColorJitter not in [type(t) for t in plain.transforms]
    off, test2 = build_transforms(224, augment=False, color_jitter=True)
    assert off is test2
    # a backbone's own normalisation is passed through (EfficientNet-Lite: (x - 127) / 128)
    _, eff = build_transforms(32, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    x = eff(Image.new("L", (40, 40), 255))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 1.0))
    with pytest.raises(RepnetError, match="augment must be one of"):
        build_transforms(32, augment="sometimes")


def test_recipes_match_spec_and_dataset_facts():
    """The per-dataset recipes (YAML, the one place they live) are the paper's table (docs/recipes.md); class counts and flips
    are the data layer's facts."""
    from repnet.config.recipes import load_recipe

    p = {name: load_recipe(name) for name in DATASET_INFO}
    assert (p["aircraft"]["lr"], p["aircraft"]["lr_side"], p["aircraft"]["label_smoothing"]) == (16e-4, 3e-3, 0.7)
    assert (p["cars"]["lr"], p["cars"]["lr_side"], dataset_info("cars").num_classes) == (8e-4, 1e-3, 196)
    assert (p["cub200"]["lr"], p["cub200"]["lr_side"]) == (6e-4, 3e-3)
    assert (p["flowers102"]["lr"], p["pets"]["lr"], p["pets"]["lr_side"]) == (2e-4, 1e-4, 1e-4)
    assert p["food101"]["label_smoothing"] == 0.1 and p["cifar100"]["label_smoothing"] == 0.1
    assert p["aircraft"]["augment"] == p["cars"]["augment"] == "jitter" and p["cub200"]["augment"] != "jitter"
    # the offline sets start from the CIFAR recipe; lr_side chosen per dataset on the validation split (224 px)
    for name, lr_side in (("fashion_mnist", 1e-3), ("mnist5k", 3e-3), ("digits", 1e-3)):
        assert (p[name]["lr"], p[name]["lr_side"], p[name]["label_smoothing"], dataset_info(name).num_classes) == \
            (3e-4, lr_side, 0.1, 10)
    assert not dataset_info("digits").hflip and not dataset_info("mnist5k").hflip and dataset_info("cars").hflip
    assert set(DATASET_INFO) <= set(DATASETS.names())
    assert dataset_info("imagefolder:/anything").num_classes is None
    tf, _ = build_transforms(R, augment=p["cars"]["augment"])
    assert T.ColorJitter in [type(t) for t in tf.transforms]


# ----------------------------------------------------------------------------- ImageFolder layouts
def test_imagefolder_split_layout_labels(tmp_path):
    colours = _image_tree(tmp_path, {"train": 10, "val": 3})
    s = build_datasets(f"imagefolder:{tmp_path}", image_size=R, val_fraction=0.2)
    assert s.class_names == ["cat", "dog", "fox"] and s.num_classes == 3
    assert len(s.train) == 24 and len(s.val) == 6 and len(s.test) == 9
    for ds in (s.train, s.val, s.test):
        for k in range(len(ds)):
            y, rgb = _colour_label(ds, k)
            assert rgb == colours[s.class_names[y]]
    assert s.train[0][0].shape == (3, R, R)
    # a paper dataset in the TinyTL layout (val/ = official test split) reads the same way
    f = build_datasets("flowers102", data_root=tmp_path, image_size=R)
    assert f.class_names == ["cat", "dog", "fox"] and len(f.test) == 9 and len(f.train) + len(f.val) == 30


def test_imagefolder_single_folder_split(tmp_path):
    _image_tree(tmp_path, {"": 10}, ext=".jpg")
    s = build_datasets(f"imagefolder:{tmp_path}", image_size=R, val_fraction=0.25, seed=5)
    assert len(s.test) == 6 and (s.test.class_counts() == 2).all()
    assert len(s.train) + len(s.val) == 24
    ids = [set(d.indices) for d in (s.train, s.val, s.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = build_datasets(f"imagefolder:{tmp_path}", image_size=R, val_fraction=0.25, seed=6)
    assert np.array_equal(s.test.indices, again.test.indices)  # fixed test split


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    _image_tree(tmp_path, {"train": 4, "val": 2})
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = tmp_path / "train" / "cat" / "half.jpg"
    _img(str(good), (1, 2, 3), size=32, fmt="JPEG")
    good.write_bytes(good.read_bytes()[:200])  # truncated JPEG
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image: ignored, not counted")
    with caplog.at_level(logging.WARNING, logger="repnet.data"):
        s = build_datasets(f"imagefolder:{tmp_path}", image_size=R, val_fraction=0)
    assert s.train.skipped == 2 and len(s.train) == 12
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert len(s.train.source.skipped_files) == 2


def test_file_corrupted_after_scan_never_crashes_loader(tmp_path, caplog):
    colours = _image_tree(tmp_path, {"train": 3, "val": 1})
    s = build_datasets(f"imagefolder:{tmp_path}", image_size=R, val_fraction=0)
    victim = s.train.source.samples[0][0]
    with open(victim, "wb") as f:
        f.write(b"garbage")
    with caplog.at_level(logging.WARNING, logger="repnet.data"):
        batches = list(torch.utils.data.DataLoader(s.train, batch_size=4))
    assert sum(len(b[1]) for b in batches) == len(s.train) == 9
    assert s.train.skipped == 1 and "could not decode" in caplog.text
    y, rgb = _colour_label(s.train, 0)  # the replacement keeps its own (correct) label
    assert rgb == colours[s.class_names[y]]


# ----------------------------------------------------------------------------- errors: one clear line each
@pytest.mark.parametrize("make, name, match", [
    (lambda p: None, "imagefolder:{p}/nope", "image folder '.*nope' does not exist"),
    (lambda p: _image_tree(p, {"val": 2}), "imagefolder:{p}", "no 'train' folder in"),
    (lambda p: _image_tree(p, {"train": 2}), "imagefolder:{p}", "no 'val' or 'test' folder"),
    (lambda p: os.makedirs(p / "train" / "x"), "imagefolder:{p}", "no 'val' or 'test' folder"),
    (lambda p: _img(str(p / "a.png"), (1, 1, 1)), "imagefolder:{p}",
     "no class subfolders in .*one subfolder per class"),
    (lambda p: (_image_tree(p, {"train": 2, "val": 1}), os.makedirs(p / "train" / "empty")),
     "imagefolder:{p}", "class folder '.*train/empty' has no images"),
    (lambda p: (os.makedirs(p / "train"), os.makedirs(p / "val")), "imagefolder:{p}",
     "no class subfolders in '.*train'"),
    (lambda p: (_image_tree(p, {"train": 2, "val": 1}), _img(str(p / "val" / "owl" / "0.png"), (9, 9, 9))),
     "imagefolder:{p}", "class folder '.*val/owl' has no matching class"),
    (lambda p: None, "cifar10", "dataset 'cifar10' is not on this machine: pass --data-root"),
    (lambda p: None, "nope", "unknown dataset 'nope'; choose from: .*fashion_mnist.*imagefolder:"),
])
def test_bad_inputs_give_one_clear_error(tmp_path, make, name, match):
    make(tmp_path)
    with pytest.raises(RepnetError, match=match) as err:
        build_datasets(name.format(p=tmp_path), image_size=R)
    assert "\n" not in str(err.value)


def test_paper_dataset_root_errors(tmp_path):
    with pytest.raises(RepnetError, match="data root '.*missing' does not exist"):
        build_datasets("cub200", data_root=tmp_path / "missing")
    with pytest.raises(RepnetError, match="no 'cifar10' data in .*cifar-10-batches-py"):
        build_datasets("cifar10", data_root=tmp_path)
    with pytest.raises(RepnetError, match="no 'cars' data in"):
        build_datasets("cars", data_root=tmp_path)


def test_fashion_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(RepnetError, match="apt-get install dataset-fashion-mnist.*--data-root"):
        build_datasets("fashion_mnist", data_root=tmp_path)

    def write(name, magic, dims, payload, cut=0):
        raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(raw[:len(raw) - cut])

    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).tobytes()
    write("train-images-idx3-ubyte.gz", 0x803, (3, 28, 28), imgs)
    write("train-labels-idx1-ubyte.gz", 0x801, (3,), bytes([0, 5, 9]))
    write("t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), imgs[: 2 * 784])
    write("t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes([1, 2]))
    s = build_datasets("fashion_mnist", data_root=tmp_path, image_size=R, val_fraction=0)
    assert len(s.train) == 3 and s.train.targets.tolist() == [0, 5, 9] and s.test.targets.tolist() == [1, 2]
    assert np.array_equal(np.asarray(s.test.with_transform(None)[1][0])[..., 0],
                          np.frombuffer(imgs, np.uint8)[784:1568].reshape(28, 28))
    write("t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), imgs[: 2 * 784], cut=100)
    with pytest.raises(RepnetError, match="is corrupt: header says shape"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 3)
    write("t10k-images-idx3-ubyte.gz", 0x801, (2, 28, 28), imgs[: 2 * 784])
    with pytest.raises(RepnetError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 3)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(RepnetError, match="unreadable or corrupt"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 1)


# ----------------------------------------------------------------------------- native formats (tiny real files)
def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names, "num_vis": 3072})
    train_x, train_y = [], []
    for b in range(1, 6):
        x, y = _cifar_images(4, b), [(b * 4 + i) % 10 for i in range(4)]
        _pickle(base / f"data_batch_{b}", {"batch_label": f"batch {b}", "labels": y, "data": x, "filenames": []})
        train_x.append(x)
        train_y += y
    tx = _cifar_images(3, 9)
    _pickle(base / "test_batch", {"labels": [7, 8, 9], "data": tx})
    for root in (tmp_path, base):  # the parent folder or the native folder itself
        s = build_datasets("cifar10", data_root=root, image_size=R, val_fraction=0)
        assert s.class_names == names and len(s.train) == 20 and len(s.test) == 3
        assert s.train.targets.tolist() == train_y and s.test.targets.tolist() == [7, 8, 9]
    img, y = s.train.with_transform(None)[6]
    expect = np.concatenate(train_x)[6].reshape(3, 32, 32).transpose(1, 2, 0)
    assert y == train_y[6] and np.array_equal(np.asarray(img), expect)
    assert s.train[0][0].shape == (3, R, R)
    (base / "data_batch_3").unlink()
    with pytest.raises(RepnetError, match="CIFAR file: '.*data_batch_3' is missing"):
        build_datasets("cifar10", data_root=tmp_path)
    (base / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(RepnetError, match="data_batch_3' is corrupt"):
        build_datasets("cifar10", data_root=tmp_path)


def test_cifar100_python_files(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    _pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    _pickle(base / "train", {"fine_labels": [3, 99, 50, 3], "coarse_labels": [0] * 4, "data": _cifar_images(4, 1)})
    _pickle(base / "test", {"fine_labels": [99, 0], "coarse_labels": [0] * 2, "data": _cifar_images(2, 2)})
    s = build_datasets("cifar100", data_root=tmp_path, image_size=R, val_fraction=0)
    assert s.num_classes == 100 and s.train.targets.tolist() == [3, 99, 50, 3] and s.test.targets.tolist() == [99, 0]


def test_cub200_native_tree(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    colours = {}
    lines, labels, split = [], [], []
    n = 0
    for c, cls in enumerate(classes):
        colours[c] = (60 * c + 10, 20, 200 - 60 * c)
        for i in range(4):
            n += 1
            rel = f"{cls}/{cls.split('.')[1]}_{i:04d}.jpg"
            _img(str(base / "images" / rel), colours[c], fmt="JPEG")
            lines.append(f"{n} {rel}")
            labels.append(f"{n} {c + 1}")
            split.append(f"{n} {1 if i < 3 else 0}")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    s = build_datasets("cub200", data_root=tmp_path, image_size=R, val_fraction=1 / 3)
    assert s.class_names == classes and len(s.test) == 3 and len(s.train) == 6 and len(s.val) == 3
    assert s.test.targets.tolist() == [0, 1, 2] and (s.val.class_counts() == 1).all()
    for k in range(len(s.train)):
        img, y = s.train.with_transform(None)[k]
        assert np.abs(np.asarray(img)[4, 4].astype(int) - colours[y]).max() <= 8  # JPEG colour
    (base / "train_test_split.txt").write_text("1 1\n2 x\n")
    with pytest.raises(RepnetError, match="non-integer"):
        build_datasets("cub200", data_root=tmp_path)
    (base / "images.txt").unlink()
    with pytest.raises(RepnetError, match="CUB-200-2011 file: '.*images.txt' is missing"):
        build_datasets("cub200", data_root=tmp_path)


def test_flowers102_native_mat_files(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3])  # image_00001 .. image_00009
    for i, y in enumerate(labels, 1):
        _img(str(base / "jpg" / f"image_{i:05d}.jpg"), (80 * y, 10, 10), fmt="JPEG")
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                 "tstid": np.array([[7, 8, 9]])})
    s = build_datasets("flowers102", data_root=tmp_path, image_size=R, val_fraction=0)
    assert s.class_names == ["1", "2", "3"] and len(s.train) == 6 and s.test.targets.tolist() == [0, 1, 2]


def test_torchvision_parsed_formats(tmp_path):
    # Oxford-IIIT Pets: annotations/{trainval,test}.txt "<image_id> <class 1..37> <species> <breed id>"
    pets = tmp_path / "pets" / "oxford-iiit-pet"
    rows = {"trainval": ["Abyssinian_1 1 1 1", "Abyssinian_2 1 1 1", "beagle_1 2 2 1", "beagle_2 2 2 1"],
            "test": ["Abyssinian_3 1 1 1", "beagle_3 2 2 1"]}
    for split, lines in rows.items():
        for line in lines:
            _img(str(pets / "images" / f"{line.split()[0]}.jpg"), (50, 50, 50), fmt="JPEG")
        os.makedirs(pets / "annotations", exist_ok=True)
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    s = build_datasets("pets", data_root=tmp_path / "pets", image_size=R, val_fraction=0)
    assert s.class_names == ["Abyssinian", "Beagle"] and s.train.targets.tolist() == [0, 0, 1, 1]
    assert s.test.targets.tolist() == [0, 1]

    # FGVC Aircraft: data/variants.txt, data/images_variant_{trainval,test}.txt "<image> <variant>"
    air = tmp_path / "air" / "fgvc-aircraft-2013b" / "data"
    os.makedirs(air)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    (air / "images_variant_trainval.txt").write_text("0000001 707-320\n0000002 A300B4\n0000003 A300B4\n")
    (air / "images_variant_test.txt").write_text("0000004 A300B4\n")
    for i in range(1, 5):
        _img(str(air / "images" / f"{i:07d}.jpg"), (1, 2, 3), fmt="JPEG")
    from repnet.config.recipes import load_recipe  # (the augmentation is the recipe's: YAML only)

    s = build_datasets("aircraft", data_root=tmp_path / "air", image_size=R, val_fraction=0,
                       augment=load_recipe("aircraft")["augment"])
    assert s.class_names == ["707-320", "A300B4"] and s.train.targets.tolist() == [0, 1, 1]
    assert s.test.targets.tolist() == [1]
    assert T.ColorJitter in [type(t) for t in s.train.transform.transforms]  # aircraft preset

    # Food-101: meta/{train,test}.json {"class": ["class/id", ...]}, images/<class>/<id>.jpg
    food = tmp_path / "food" / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]}}
    os.makedirs(food / "meta")
    for split, m in meta.items():
        (food / "meta" / f"{split}.json").write_text(json.dumps(m))
        for rels in m.values():
            for rel in rels:
                _img(str(food / "images" / f"{rel}.jpg"), (9, 9, 9), fmt="JPEG")
    s = build_datasets("food101", data_root=tmp_path / "food", image_size=R, val_fraction=0)
    assert s.class_names == ["apple_pie", "ramen"] and sorted(s.train.targets.tolist()) == [0, 0, 1]


def test_stanford_cars_native_mat_files(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    rec = [("fname", "O"), ("class", "O")]
    os.makedirs(base / "devkit")
    names = np.array(["AM General Hummer", "Acura RL"], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    savemat(base / "devkit" / "cars_train_annos.mat",
            {"annotations": np.array([("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)], dtype=rec)})
    savemat(base / "cars_test_annos_withlabels.mat",
            {"annotations": np.array([("00001.jpg", 2), ("00002.jpg", 1)], dtype=rec)})
    for split, n in (("cars_train", 3), ("cars_test", 2)):
        for i in range(1, n + 1):
            _img(str(base / split / f"{i:05d}.jpg"), (5, 5, 5), fmt="JPEG")
    s = build_datasets("cars", data_root=tmp_path, image_size=R, val_fraction=0)
    assert s.class_names == ["AM General Hummer", "Acura RL"]
    assert s.train.targets.tolist() == [0, 1, 1] and s.test.targets.tolist() == [1, 0]
    with pytest.raises(RepnetError, match="cannot be downloaded any more"):
        build_datasets("cars", data_root=tmp_path / "elsewhere", download=True)


def test_registry_lists_everything():
    names = DATASETS.names(with_prefixes=True)
    for n in ("fashion_mnist", "mnist5k", "digits", "flowers102", "cars", "cub200", "pets", "aircraft", "food101",
              "cifar10", "cifar100", "imagefolder:<name>"):
        assert n in names and DATASETS.help(n)
    assert isinstance(build_datasets("digits", image_size=R).train, ImageDataset)


def test_download_only_when_asked(tmp_path, monkeypatch):
    from repnet.data import datasets as dmod
    from repnet.data.native import NATIVE_FORMATS

    calls = []

    def fake_download(root):  # stands in for torchvision's downloader: writes the native files
        calls.append(root)
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        _pickle(base / "batches.meta", {"label_names": [str(i) for i in range(10)]})
        for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
            _pickle(base / name, {"labels": [0, 1], "data": _cifar_images(2, 0)})

    monkeypatch.setattr(NATIVE_FORMATS["cifar10"], "download", fake_download)
    monkeypatch.setattr(dmod, "DEFAULT_DOWNLOAD_ROOT", str(tmp_path / "cache"))
    with pytest.raises(RepnetError, match="no 'cifar10' data in"):
        build_datasets("cifar10", data_root=tmp_path)
    assert calls == []
    s = build_datasets("cifar10", image_size=R, download=True, val_fraction=0)
    assert calls == [tmp_path / "cache" / "cifar10"] and len(s.train) == 10 and len(s.test) == 2
    build_datasets("cifar10", image_size=R, download=True)  # already there: no second download
    assert len(calls) == 1
