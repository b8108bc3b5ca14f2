"""The runtime registry is the one extension point for where training steps run: a runtime added
through the registry alone trains through the one loop, and what a runtime refuses is one line."""
import pytest
import torch

from repnet.config.recipes import make_config
from repnet.errors import RepnetError
from repnet.runtime import RUNTIMES, Runtime, get_runtime, runtime_names
from repnet.training.run import train


class CountingTrainer:
    """A whole training step done outside the loop's own optimizer (what a device runtime does)."""

    def __init__(self, model, lr):
        self.model, self.steps = model, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.before = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.SGD(self.params, lr=lr)
        self.loss = torch.nn.CrossEntropyLoss()

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.loss(logits, y)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return loss.detach(), logits.detach()

    def results(self):
        return {"dummy_steps": self.steps}


@pytest.fixture
def dummy_runtime():
    made = []

    @RUNTIMES.register("dummy", help="a test runtime")
    class Dummy(Runtime):
        name = "dummy"

        def check(self, cfg, resume=False):
            if cfg.int8:
                raise RepnetError("--int8 is not supported with --runtime dummy: test")

        def trainer(self, model, cfg, schedule, say):
            t = CountingTrainer(model, cfg.lr)
            made.append(t)
            return t

    yield made
    RUNTIMES.unregister("dummy")


def test_a_runtime_added_through_the_registry_alone_trains_through_the_loop(tmp_path, dummy_runtime):
    assert "dummy" in runtime_names()
    cfg = make_config({"dataset": "digits", "backbone": "proxylessnas_mobile", "method": "last", "random_init": True,
                       "image_size": 32, "epochs": 1, "steps_per_epoch": 1, "batch_size": 8, "workers": 0,
                       "progress": False, "profile_memory": False, "runtime": "dummy", "lr": 0.1,
                       "out_dir": str(tmp_path / "run")})
    res = train(cfg)
    (trainer,) = dummy_runtime
    assert trainer.steps == 1 and res["steps"] == 1 and res["dummy_steps"] == 1 and res["runtime"] == "dummy"
    assert all(not torch.equal(a, b) for a, b in zip(trainer.params, trainer.before))  # its step trained the head
    assert sum(p.numel() for p in trainer.params) == res["trainable_params"]
    with pytest.raises(RepnetError, match="not supported with --runtime dummy"):
        train(make_config({**cfg.to_dict(), "int8": True, "out_dir": str(tmp_path / "other")}))
    assert not (tmp_path / "other").exists()  # refused before the folder is touched


def test_unknown_runtime_is_one_line():
    with pytest.raises(RepnetError, match="runtime=.nope. is not valid; choose from: device, eager, executorch"):
        make_config({"runtime": "nope"})
    with pytest.raises(RepnetError, match="unknown runtime 'nope'"):
        get_runtime("nope")
