"""Gradient accumulation in the one training loop (``accum_steps``): k micro-batches of b/k make
the update one batch of b makes, resume stays bit-identical, and the key is a ``repnet train`` flag.

Tiny runs: ProxylessNAS (random init) at 32 px, ``workers=0``.
"""
import json

import pytest
import torch
from torch.utils.data import Dataset

import repnet
from repnet.cli import build_parser, main
from repnet.commands.flags import overrides_from
from repnet.config.build import build_model
from repnet.config.recipes import make_config
from repnet.training.loop import CosineSchedule, fit, make_optimizer
from repnet.training.run import train
from tests.helpers import TINY


class _Images(Dataset):
    """n fixed random 32 px images with labels (no augmentation: the order alone is seeded)."""

    def __init__(self, n=20, classes=10):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _fit(method, batch_size, accum_steps, optimizer="sgd"):
    torch.manual_seed(0)
    model = repnet.get_model("proxylessnas_mobile", method, 10, image_size=32, pretrained=False)
    model.head[0].p = 0.0  # dropout draws its masks per forward: a batch split in two draws other ones
    cfg = make_config(dict(dataset="digits", image_size=32, batch_size=batch_size, accum_steps=accum_steps,
                           epochs=2, optimizer=optimizer, lr=0.05, workers=0, progress=False))
    opt = make_optimizer(model, cfg)
    ds = _Images()
    steps = 2 * (len(ds) // (batch_size * accum_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineSchedule(steps))
    losses = []
    st = fit(model, ds, cfg, torch.device("cpu"), opt, scheduler=sched,
             on_step=lambda info: losses.append(info["loss"]))
    return model.trainable_state_dict(), st, losses


@pytest.mark.parametrize("method", ["bias", "last"])
def test_k_micro_batches_make_the_update_of_one_batch(method):
    """Frozen norms in eval mode (bias: every gradient flows back through the frozen backbone):
    8 = 4 x 2 = 2 x 4 = 1 x 8 images per step give the same weights after 4 SGD-momentum steps
    (20 images: two steps an epoch, the same 4 images left out), the same step losses and the
    same counters."""
    ref, st_ref, loss_ref = _fit(method, 8, 1)
    assert st_ref["step"] == 4 and len(loss_ref) == 4
    for b, k in ((4, 2), (2, 4), (1, 8)):
        got, st, losses = _fit(method, b, k)
        assert st["step"] == 4 and st["epoch"] == 2 and len(losses) == 4, (b, k)
        assert st["images"] == st_ref["images"] == 32
        for name, t in ref.items():
            torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=f"{name} at {b} x {k}")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(loss_ref), rtol=0, atol=1e-6)


def test_the_last_partial_group_is_dropped():
    """20 images at 4 x 2: two steps an epoch (16 images), as batch 8's drop_last gives."""
    cfg = make_config(dict(dataset="digits", image_size=32, batch_size=4, accum_steps=2, epochs=1, workers=0,
                           progress=False))
    from repnet.training.loop import plan_steps

    assert plan_steps(20, cfg) == (2, 2)
    with pytest.raises(repnet.RepnetError, match="less than one batch of 4 x 2 accumulation steps"):
        plan_steps(7, cfg)


def _cfg(tmp_path, name, **kw):
    base = {**TINY, "method": "repnet", "memory": "vanilla", "batch_size": 4, "accum_steps": 2, "epochs": 2,
            "steps_per_epoch": 3, "checkpoint_every": 2, "out_dir": str(tmp_path / name)}
    base.update(kw)
    return make_config(base)


class Killed(Exception):
    pass


def test_resume_with_accumulation_is_bit_identical(tmp_path):
    """Checkpoints fall between optimizer steps (no partial gradient is saved): killed after step
    4 of 6 and resumed from step 4's checkpoint, the weights, optimizer and log equal the
    uninterrupted run's."""
    ref = train(_cfg(tmp_path, "ref"))

    def kill(info):
        if info["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(tmp_path, "killed"), on_step=kill)
    res = train(_cfg(tmp_path, "killed"), resume=str(tmp_path / "killed"))
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 6 and res["steps"] == ref["steps"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]
    log = [(tmp_path / n / "log.jsonl").read_text().splitlines() for n in ("ref", "killed")]
    assert [json.loads(r)["train_loss"] for r in log[0]] == [json.loads(r)["train_loss"] for r in log[1]]
    assert res["final_test_accuracy"] == ref["final_test_accuracy"]


def test_accum_steps_and_frozen_bits_are_train_flags(tmp_path, capsys):
    parser = build_parser()
    args = parser.parse_args(["train", "--batch-size", "2", "--accum-steps", "4", "--frozen-bits", "linear"])
    cfg = make_config(overrides_from(args))
    assert (cfg.batch_size, cfg.accum_steps, cfg.frozen_bits) == (2, 4, "linear")
    assert make_config(overrides_from(parser.parse_args(["train", "--set", "accum_steps=3"]))).accum_steps == 3
    assert make_config({}).accum_steps == 1 and make_config({}).frozen_bits == "none"
    cfg = make_config(dict(backbone="proxylessnas_mobile", image_size=32, frozen_bits="linear"))
    assert build_model(cfg, 10, pretrained=False).frozen_bits == "linear"
    assert not getattr(build_model(make_config(dict(backbone="proxylessnas_mobile", image_size=32)), 10,
                                   pretrained=False), "frozen_bits", None)
    code = main(["train", "--dataset", "digits", "--accum-steps", "0", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: accum_steps must be >= 1, got 0"
