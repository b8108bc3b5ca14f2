import os

import pytest
import torch

torch.set_num_threads(1)  # 2-core CI machines: 1 thread per test process is fastest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
