import os

import pytest
import torch

torch.set_num_threads(1)  # 2-core CI machines: 1 thread per test process is fastest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """``repnet list``'s cache in a folder of the test session, not the user's home."""
    monkeypatch.setenv("REPNET_CACHE", str(tmp_path_factory.getbasetemp() / "repnet-cache"))
