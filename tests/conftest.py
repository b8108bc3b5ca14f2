import pytest
import torch

from tests.helpers import TINY, TINY_TRAIN_ARGS

torch.set_num_threads(1)  # 2-core CI machines: 1 thread per test process is fastest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """``repnet list``'s cache in a folder of the test session, not the user's home."""
    monkeypatch.setenv("REPNET_CACHE", str(tmp_path_factory.getbasetemp() / "repnet-cache"))


@pytest.fixture
def tiny() -> dict:
    """``TrainConfig`` overrides of the tiny run (``tests/helpers.py``): a fresh copy to change."""
    return dict(TINY)


@pytest.fixture
def tiny_train_args() -> list[str]:
    """The tiny run as ``repnet train`` arguments: a fresh copy to extend."""
    return list(TINY_TRAIN_ARGS)
