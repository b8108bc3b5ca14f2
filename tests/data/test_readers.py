"""Dataset readers: pickled batches go through the restricted unpickler, image trees are walked safely, wide images are scaled."""
import pickle
import numpy as np
import pytest
from repnet import RepnetError
from repnet.storage import (restricted_unpickle)
from tests.helpers import evil_pickle, one_line


# ----------------------------------------------------------------------------- each file-taking path
def test_cifar_batches_go_through_the_restricted_unpickler(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    evil_pickle(base / "batches.meta", tmp_path / "marker", wrap=lambda p: {"label_names": p})
    from repnet.data import build_datasets

    with pytest.raises(RepnetError) as e:
        build_datasets("cifar10", data_root=tmp_path)
    assert "refused" in one_line(e) and not (tmp_path / "marker").exists()
    # a payload inside a data batch too
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for b in range(1, 6):
        evil_pickle(base / f"data_batch_{b}", tmp_path / "marker",
                     wrap=lambda p: {"labels": [0], "data": np.zeros((1, 3072), np.uint8), "x": p})
    with pytest.raises(RepnetError) as e:
        build_datasets("cifar10", data_root=tmp_path)
    one_line(e)
    assert not (tmp_path / "marker").exists()


def test_restricted_unpickler_reads_real_cifar_style_pickles(tmp_path):
    """Protocol 2 (python-2 style, as the real files) and the current protocol both load."""
    obj = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2], "batch_label": "b",
           "f": 1.5, "t": (1, None, True)}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"p{proto}"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=proto)
        got = restricted_unpickle(path)
        assert np.array_equal(got["data"], obj["data"]) and got["labels"] == [1, 2] and got["t"] == (1, None, True)
    with open(tmp_path / "obj", "wb") as f:  # object arrays are refused (they can hold anything)
        pickle.dump({"data": np.array([1, "a"], dtype=object)}, f)
    with pytest.raises(RepnetError, match="object arrays"):
        restricted_unpickle(tmp_path / "obj")


# ----------------------------------------------------------------------------- data scanning
def test_symlink_loop_in_an_image_folder_is_walked_once(tmp_path):
    import os

    from PIL import Image

    from repnet.data.imagefolder import load_split_folders

    for split in ("train", "val"):
        for ci, c in enumerate(("a", "b")):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (40 * i, 100 * ci, 0)).save(d / f"{i}.png")
    os.symlink(tmp_path / "train", tmp_path / "train" / "a" / "loop")  # a -> .. -> a -> ...
    train, test = load_split_folders(tmp_path, verify=False)
    assert len(train) == 10 and sorted(np.bincount(train.targets).tolist()) == [5, 5]
    assert len(test) == 10


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from repnet.data.core import to_rgb

    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63,000 of 65,535
    Image.fromarray(a).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].max() == round(63000 / 65535 * 255) and rgb[0, 1, 0] == round(1000 / 65535 * 255)
    assert (rgb[..., 0] == 255).mean() == 0  # PIL's convert("RGB") makes 98% of these pixels white
