"""--tune: learning rates chosen on the validation split only, diverging trials skipped, resumable to the bit."""
import json

import pytest
import torch

from repnet.config.recipes import make_config
from repnet.errors import RepnetError
from repnet.storage import read_safetensors
from repnet.training import tune as tune_module
from repnet.training import run as run_module
from repnet.training.run import resume_config, train
from tests.helpers import TINY


def _cfg(tmp_path, name, **kw):
    return make_config({**TINY, "method": "repnet", "memory": "vanilla", "batch_size": 8, "epochs": 2,
                        "steps_per_epoch": 4, "tune": True, "tune_fraction": 0.25, "val_fraction": 0.2,
                        "out_dir": str(tmp_path / name), **kw})


class Killed(Exception):
    pass


def test_tune_chooses_on_validation_only_and_never_reads_the_test_split(tmp_path, monkeypatch):
    real = run_module.build_data
    reads = {"test": 0}

    class WrongTest(torch.utils.data.Dataset):
        """The real test split with every label wrong; counts every read."""

        def __init__(self, ds, num_classes):
            self.ds, self.k = ds, num_classes
            self.targets = (torch.as_tensor(ds.targets) + 1) % num_classes

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            reads["test"] += 1
            x, y = self.ds[i]
            return x, (int(y) + 1) % self.k

    res = train(_cfg(tmp_path, "a"))
    tuned = res["tune"]
    assert tuned["key"] == "lr_side" and tuned["grid"] == list(tune_module.GRIDS["lr_side"])
    assert [t["value"] for t in tuned["trials"]] == tuned["grid"] and tuned["steps_per_trial"] == 2  # 8 steps x 0.25
    best = min(tuned["trials"], key=lambda t: t["val_loss"])
    assert tuned["value"] == best["value"] == res["config"]["lr_side"]

    def wrong_labels(cfg, *a, **k):
        tr, va, te, n, names = real(cfg, *a, **k)
        return tr, va, WrongTest(te, n), n, names

    def no_test_reads(*a, **k):  # the trials end before the run touches its test split
        assert reads["test"] == 0
        return real_tune(*a, **k)

    real_tune = tune_module.tune
    monkeypatch.setattr(run_module, "build_data", wrong_labels)
    monkeypatch.setattr(tune_module, "tune", no_test_reads)
    res2 = train(_cfg(tmp_path, "b"))
    assert res2["tune"]["trials"] == [{**t, "time_s": t2["time_s"]} for t, t2 in
                                      zip(tuned["trials"], res2["tune"]["trials"])]
    assert res2["tune"]["value"] == tuned["value"]
    assert reads["test"] > 0  # read by the final evaluation only, after the trials


def test_a_diverging_trial_is_recorded_and_skipped(tmp_path, monkeypatch):
    import repnet.config.build as build

    real = build.build_model

    def nan_at_lr_9(cfg, *a, **k):  # the trial at lr 9 diverges: its head outputs NaN
        model = real(cfg, *a, **k)
        if cfg.lr == 9.0:
            model.head.register_forward_hook(lambda m, i, out: out * float("nan"))
        return model

    monkeypatch.setattr(build, "build_model", nan_at_lr_9)
    monkeypatch.setitem(tune_module.GRIDS, "lr", (3e-4, 9.0))
    res = train(_cfg(tmp_path, "run", method="last", epochs=1))
    trials = {t["value"]: t for t in res["tune"]["trials"]}
    assert res["tune"]["key"] == "lr" and trials[9.0]["diverged"] and not trials[3e-4]["diverged"]
    assert "loss became nan" in trials[9.0]["why"]
    assert res["tune"]["value"] == 3e-4 and res["config"]["lr"] == 3e-4


def test_tuned_run_killed_while_tuning_or_training_resumes_bit_identically(tmp_path, monkeypatch):
    import repnet.training.loop as loop

    ref = train(_cfg(tmp_path, "ref"))
    want = read_safetensors(tmp_path / "ref" / "adapter" / "adapter.safetensors")
    orig, fits = loop.fit, {"n": 0}

    def fit_then_die(*a, **k):
        fits["n"] += 1
        if fits["n"] == 3:  # during the third trial
            raise Killed
        return orig(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop, "fit", fit_then_die)
        with pytest.raises(Killed):
            train(_cfg(tmp_path, "tuning"))
    assert len(json.loads((tmp_path / "tuning" / "tune.json").read_text())["trials"]) == 2
    assert not (tmp_path / "tuning" / "checkpoint.pt").exists()

    def die_at_step_3(info):
        if info["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(tmp_path, "training"), on_step=die_at_step_3)
    assert (tmp_path / "training" / "checkpoint.pt").exists()
    for name in ("tuning", "training"):
        out = tmp_path / name
        res = train(resume_config(out), resume=str(out))
        got = read_safetensors(out / "adapter" / "adapter.safetensors")
        assert res["tune"]["value"] == ref["tune"]["value"]
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name


def test_tune_needs_a_validation_split_and_adam():
    with pytest.raises(RepnetError, match="needs val_fraction > 0"):
        make_config({**TINY, "tune": True, "val_fraction": 0})
    with pytest.raises(RepnetError, match="Adam's learning rates"):
        make_config({**TINY, "tune": True, "optimizer": "sgd"})
    with pytest.raises(RepnetError, match=r"tune_fraction must be in \(0, 1\]"):
        make_config({**TINY, "tune_fraction": 0})


def test_unset_tune_is_on_for_a_dataset_without_a_recipe_where_the_run_can_tune():
    from repnet.config.recipes import tunes

    assert tunes(make_config({"dataset": "imagefolder:/anything"}))  # the user's own data: rates chosen for it
    assert not tunes(make_config({"dataset": "fashion_mnist"}))  # a registry dataset trains with its recipe
    assert tunes(make_config({"dataset": "fashion_mnist", "tune": True}))
    assert not tunes(make_config({"dataset": "imagefolder:/anything", "tune": False}))
    assert not tunes(make_config({"dataset": "imagefolder:/anything", "optimizer": "sgd"}))
    assert not tunes(make_config({"dataset": "imagefolder:/anything", "val_fraction": 0}))
    assert not tunes(make_config({"dataset": "imagefolder:/anything", "runtime": "executorch"}))
