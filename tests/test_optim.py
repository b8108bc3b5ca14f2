"""The one optimizer factory and the one schedule: warm-up then cosine, hand-computed values; the side
modules' own weight decay reaches only their group."""
import math

import pytest
import torch

import repnet
from repnet.config.recipes import make_config
from repnet.optim import CosineSchedule, build_optimizer
from repnet.training.loop import make_optimizer, schedule_of
from tests.helpers import TINY


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    s = CosineSchedule(10, warmup_steps=4)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(10) == pytest.approx(0.0, abs=1e-12)
    assert s(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert [CosineSchedule(8)(i) for i in (0, 4, 8)] == [1.0, pytest.approx(0.5), pytest.approx(0.0, abs=1e-12)]
    assert CosineSchedule.for_run(200, 0.05).warmup_steps == 10
    cfg = make_config({**TINY, "warmup_fraction": 0.1})
    assert schedule_of(cfg, 50).warmup_steps == 5 and schedule_of(make_config(TINY), 50).warmup_steps == 0


def test_optimizers_and_the_side_modules_own_weight_decay():
    w = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(build_optimizer("adamw", w, 1e-3, 0.1), torch.optim.AdamW)
    sgd = build_optimizer("sgd", w, 1e-2)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("lamb", w, 1e-3)
    model = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=32, pretrained=False)
    opt = make_optimizer(model, make_config({**TINY, "method": "repnet", "weight_decay": 1e-5,
                                             "weight_decay_side": 1e-3}))
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"head+backbone": 1e-5, "side": 1e-3}
    opt = make_optimizer(model, make_config({**TINY, "method": "repnet", "weight_decay": 1e-5}))
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-5}
