"""Hyb-Learn (repnet.continual.methods.hyblearn): tile scores, tile freezing, the continual run."""
import json

import pytest
import torch
from torch import nn

from repnet.cli import main
from repnet.continual.model import MultiTaskModel
from repnet.continual.sequence import train_sequence
from repnet.continual.methods.hyblearn import (HybLearn, HybLearnOptions, TileFreeze, accumulate, choose_frozen,
                                       input_covariances, make_tiles, old_subspaces, tile_scores, tiled_layers)

SIZE = 32


class _TwoTiles(nn.Module):
    """A grouped 1x1 conv (4 -> 2 channels, 2 groups: tile 0 reads channels 0-1, tile 1 channels 2-3)
    + pooling + a 3-way head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 2, 1, groups=2, bias=False)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _data(old: bool, n=32):
    """Old tasks: energy along channel 0 (group 0) and channel 2 (group 1). The new task keeps
    group 0's inputs where the old tasks had them (channel 0), and moves group 1's to channel 3."""
    g = torch.Generator().manual_seed(1 if old else 2)
    x = torch.zeros(n, 4, 4, 4)
    y = torch.randint(0, 3, (n,), generator=g)
    signal = (y.float() - 1)[:, None, None] + 0.3 * torch.randn(n, 4, 4, generator=g)
    x[:, 0] = signal
    x[:, 2 if old else 3] = torch.randn(n, 4, 4, generator=g) + signal
    return x, y


def test_score_ranks_the_tile_earlier_tasks_rely_on_above_one_with_new_inputs():
    model = _TwoTiles()
    xo, _ = _data(old=True)
    total = accumulate(None, input_covariances(model, model, [xo[:16], xo[16:]]))
    tiles = make_tiles(model, 1)
    assert [(t.start, t.stop, t.size) for t in tiles] == [(0, 1, 2), (1, 2, 2)]
    xn, yn = _data(old=False)
    scores = tile_scores(model, model, [(xn, yn)], old_subspaces(total, 0.97), tiles)
    assert scores[0] > 0.99 and scores[1] < 0.05   # tile 0's update lies in the old inputs; tile 1's does not
    assert choose_frozen(tiles, scores, 0.5) == [True, False]
    # a random tile (random inputs for the new task) against the relied-on one
    xr = xn.clone()
    xr[:, 2:] = torch.randn(32, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    s2 = tile_scores(model, model, [(xr, yn)], old_subspaces(total, 0.97), tiles)
    assert s2[0] > s2[1]


def test_old_subspace_keeps_the_energy_share():
    cov = {"l": torch.diag(torch.tensor([[4.0, 3.0, 2.0, 1.0]]).squeeze())[None]}
    u = old_subspaces(accumulate(None, cov), 0.65)["l"][0]  # 0.4, 0.7 -> two directions hold >= 65 %
    kept = (u.abs().sum(0) > 0).tolist()
    assert kept == [True, True, False, False]
    assert torch.allclose(u[:, :2].T @ u[:, :2], torch.eye(2), atol=1e-6)


@pytest.mark.parametrize("ssl_epochs", [0, 1])
def test_frozen_tiles_are_bitwise_unchanged_and_retrained_tiles_move(ssl_epochs):
    from repnet.config.build import build_data
    from repnet.config.recipes import make_config
    from repnet.training import loop

    cfg = make_config({"dataset": "digits", "image_size": SIZE, "epochs": 1, "train_subset": 48, "batch_size": 8,
                       "workers": 0, "progress": False, "augment": "basic", "val_fraction": 0.0})
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, naive=True)
    train_ds, _, _, n, _ = build_data(cfg, mt.backbone.mean, mt.backbone.std)
    tm = mt.add_task("a", n, "full", bn="frozen")
    opts = HybLearnOptions(freeze_ratio=0.7, tile=32, score_batches=2, ssl_epochs=ssl_epochs)
    hyb = HybLearn(opts, mt.backbone)
    before = {k: v.clone() for k, v in mt.backbone.state_dict().items()}
    rec = hyb.before_task(tm, train_ds, cfg, torch.device("cpu"), seed=0, name="a")
    assert 0.7 <= rec["freeze_ratio"] < 0.75
    frozen = hyb._frozen
    mt.set_task("a")
    loop.fit(mt, train_ds, cfg, torch.device("cpu"), loop.make_optimizer(tm, cfg))
    rec.update(hyb.after_task(tm))
    after = mt.backbone.state_dict()
    layers = tiled_layers(mt.backbone)
    names = {id(m): n for n, m in mt.backbone.named_modules()}
    moved = 0
    for t, f in zip(hyb.tiles, frozen):
        conv, norm = layers[t.layer]
        keys = [f"{t.layer}.weight"] + ([f"{names[id(norm)]}.weight", f"{names[id(norm)]}.bias"] if norm else [])
        for k in keys:
            same = torch.equal(after[k][t.start:t.stop], before[k][t.start:t.stop])
            if f:
                assert same, k
            else:
                moved += not same
    assert moved > 0
    assert all(torch.equal(after[k], before[k]) for k in after if "running" in k)  # statistics fixed
    assert rec["frozen_weights_changed"] == 0
    written = sum(int((after[k] != before[k]).sum()) for k in after)
    assert rec["weights_written"] == written <= (1 - opts.freeze_ratio) * rec["backbone_weights"]
    assert all(p.requires_grad for p in mt.backbone.parameters())  # released


def test_fully_frozen_layers_keep_nothing_for_backward():
    from repnet.memory.measure import measure_saved_bytes

    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, naive=True)
    tm = mt.add_task("a", 3, "full", bn="frozen")
    x = torch.randn(2, 3, SIZE, SIZE)
    everything = measure_saved_bytes(tm, x)
    tiles = make_tiles(mt.backbone, 64)
    freeze = TileFreeze(mt.backbone, tiles, [True] * len(tiles))
    assert measure_saved_bytes(tm, x) < everything / 3
    freeze.release()


def _kw(**extra):
    return dict(backbone="mobilenet_v2", method="hyblearn", image_size=SIZE, epochs=1, train_subset=64,
                test_subset=48, batch_size=16, workers=0, progress=False, augment="basic", **extra)


def test_hyblearn_sequence_reports_and_resumes_bit_identically(tmp_path, monkeypatch):
    opts = {"freeze_ratio": 0.8, "tile": 64, "score_batches": 2}
    ref = train_sequence("digits,mnist5k", out_dir=tmp_path / "ref", options=opts, **_kw())
    assert ref["method"] == "hyblearn" and ref["complete"] and len(ref["acc"]) == 2
    assert ref["backward_transfer"] is not None
    for t in ref["per_task"]:
        h = t["hyblearn"]
        assert 0.8 <= h["freeze_ratio"] < 0.85
        assert h["weights_written"] <= 0.2 * h["backbone_weights"] and h["frozen_weights_changed"] == 0
    saved = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert saved["hyblearn"]["freeze_ratio"] == 0.8 and (tmp_path / "ref" / saved["state_file"]).is_file()
    assert sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors")) == ["hyblearn-state-2.safetensors"]

    real = MultiTaskModel.save
    calls = {"n": 0}

    def crash_on_second(self, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, directory)

    monkeypatch.setattr(MultiTaskModel, "save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", options=opts, **_kw())
    monkeypatch.setattr(MultiTaskModel, "save", real)
    res = train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", resume=True, options=opts, **_kw())
    assert res["acc"] == ref["acc"]
    assert [t["hyblearn"]["weights_written"] for t in res["per_task"]] == \
        [t["hyblearn"]["weights_written"] for t in ref["per_task"]]


@pytest.mark.parametrize("args, message", [
    (["--opt", "freeze_ratio=1.5"], "freeze_ratio=1.5 is not valid"),
    (["--opt", "bn=batch"], "choose from: frozen"),
    (["--opt", "tiles=3"], "unknown option 'tiles' for method 'hyblearn'"),
    (["--naive"], "does not combine with naive"),
    (["--int8"], "does not combine with int8"),
])
def test_bad_hyblearn_options_are_one_line(tmp_path, capsys, args, message):
    rc = main(["continual", "--tasks", "digits,mnist5k", "--method", "hyblearn", "--image-size", "32",
               "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_list_shows_hyblearn_with_its_options(capsys):
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    assert "hyblearn" in out and "--opt freeze_ratio=0.8" in out and "--opt tile=64" in out
