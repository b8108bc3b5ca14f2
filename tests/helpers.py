"""What many tests share: the tiny run every fast test trains, and hostile files.

The tiny run: scikit-learn's 8x8 digits on a randomly initialised ProxylessNAS-Mobile at 32 px, one
worker process, no progress bars, no memory profile (seconds on one core). Tests take it as the
``tiny`` / ``tiny_train_args`` fixtures (``conftest.py``) and change only what they are about.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

#: ``TrainConfig`` overrides of the tiny run.
TINY = dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, image_size=32, workers=0,
            progress=False, profile_memory=False)
#: The tiny run as ``repnet train`` arguments (one epoch of one step).
TINY_TRAIN_ARGS = ["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init", "--image-size",
                   "32", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--quiet", "--no-profile"]


class Payload:
    """A real pickle payload: unpickling it naively runs ``exec``, which writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_pickle(path, marker, wrap=lambda p: p):
    with open(path, "wb") as f:
        pickle.dump(wrap(Payload(marker)), f)


def evil_torch(path, marker):
    """A ``torch.save`` zip whose data.pkl runs code (what a crafted checkpoint looks like)."""
    torch.save({"model": {}, "x": Payload(marker)}, path)


def one_line(excinfo):
    """The message of a refused read: one line, never PyTorch's advice to unpickle anyway."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    assert "weights_only=False" not in msg
    return msg


def flip_bytes(path: Path, where: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(where, where + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tiny_train(tmp_path: Path, name: str, **overrides) -> Path:
    """Train the tiny run (``last``, two steps, plain PyTorch) into ``tmp_path / name``; its folder."""
    from repnet.config.recipes import make_config
    from repnet.training.run import train

    train(make_config({**TINY, "method": "last", "memory": "vanilla", "epochs": 1, "steps_per_epoch": 2,
                       "out_dir": str(tmp_path / name), **overrides}))
    return tmp_path / name
