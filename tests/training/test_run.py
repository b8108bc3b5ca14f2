"""Training: learning on real data, bit-identical resume, NaN handling, clear errors.

All runs are tiny (32-64 px, the scikit-learn ``digits`` set, a few steps, ``workers=0``) and
use ``memory="vanilla"`` where the memory engine is not under test.
"""
import json

import pytest
import torch
import yaml

from repnet import RepnetError
from repnet.cli import main
from repnet.config.schema import TrainConfig
from repnet.config.recipes import make_config
from repnet.training.run import train
from tests.helpers import TINY


def _cfg(tmp_path, name="run", **kw):
    base = {**TINY, "method": "repnet", "memory": "vanilla", "batch_size": 8, "epochs": 3, "steps_per_epoch": 4,
            "out_dir": str(tmp_path / name)}
    base.update(kw)
    return make_config(base)


class Killed(Exception):
    pass


def _kill_at(step):
    def hook(info):
        if info["step"] == step:
            raise Killed

    return hook


def _final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return ckpt


def _assert_same_tensors(a, b, where=""):
    """Every tensor in nested dicts / lists ``a`` and ``b`` is torch.equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")










# ----------------------------------------------------------------------------- learning
def test_a_few_steps_reduce_the_loss_on_real_data(tmp_path):
    """ImageNet MobileNetV2 + Rep-Net on 512 real MNIST digits at 64 px: 24 steps learn."""
    cfg = _cfg(tmp_path, dataset="mnist5k", backbone="mobilenet_v2", random_init=False, image_size=64,
               batch_size=16, epochs=3, steps_per_epoch=8, lr=3e-3, lr_side=3e-3, label_smoothing=0.0,
               augment="none", train_subset=512, test_subset=200, profile_memory=True)
    res = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["train_loss"] < 0.85 * log[0]["train_loss"]
    assert res["final_test_accuracy"] > 0.25  # 10 classes: chance is 0.1
    assert res["trainable_params"] < res["total_params"] and res["steps"] == 24
    for key in ("best_val_accuracy", "analytic_mb", "peak_mb", "wall_time_s", "config"):
        assert key in res
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["final_test_accuracy"] == res["final_test_accuracy"]
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 3e-3
    assert (run / "adapter" / "adapter.safetensors").is_file()


# ----------------------------------------------------------------------------- resume
# dropout (0.2) and augmentation are on, backbone BN uses batch statistics (running stats train
# too), checkpoints every 3 steps and at epoch ends (4 steps per epoch, 3 epochs)
RESUME_KW = dict(checkpoint_every=3, options={"bn": "batch"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resume test compares against."""
    tmp = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    res = train(_cfg(tmp, "ref", **RESUME_KW))
    return tmp / "ref", res


def _assert_same_run(ref_dir, ref_res, run_dir, res):
    a, b = _final_state(ref_dir), _final_state(run_dir)
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["scheduler"] == b["scheduler"] and a["state"]["step"] == b["state"]["step"] == 12
    assert res["final_test_accuracy"] == ref_res["final_test_accuracy"]
    log_a = [json.loads(x) for x in (ref_dir / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_b] == [1, 2, 3]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [r[key] for r in log_a] == [r[key] for r in log_b]


@pytest.mark.parametrize("kill_at", [2, 4, 5, 9])
def test_resume_after_kill_is_bit_identical(tmp_path, reference, kill_at):
    """Killed after step ``kill_at`` (between checkpoints, or at an epoch's last step before its
    checkpoint), then resumed from the last checkpoint: every tensor of the model and the
    optimizer, the scheduler, the log and the test accuracy equal the uninterrupted run's."""
    cfg = _cfg(tmp_path, "killed", **RESUME_KW)
    with pytest.raises(Killed):
        train(cfg, on_step=_kill_at(kill_at))
    res = train(cfg, resume=str(tmp_path / "killed"))
    _assert_same_run(*reference, tmp_path / "killed", res)


def test_worker_processes_change_nothing(tmp_path, reference):
    """Order and augmentation are drawn per item from (seed, epoch, index): a run with 2 loader
    workers, killed and resumed, equals the single-process reference bit for bit."""
    cfg = _cfg(tmp_path, "workers", workers=2, **RESUME_KW)
    with pytest.raises(Killed):
        train(cfg, on_step=_kill_at(6))
    res = train(cfg, resume=str(tmp_path / "workers"))
    _assert_same_run(*reference, tmp_path / "workers", res)


def test_kill_during_checkpoint_write_then_resume_from_cli(tmp_path, reference, monkeypatch):
    """A kill while a checkpoint is being written leaves the previous one intact (atomic)."""
    from pathlib import Path

    real_write, calls = Path.write_bytes, {"n": 0}

    def dying_write(self, data):  # the checkpoint's bytes go to the atomic writer's temporary file
        if self.name.endswith("-checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 3:  # saves: step 0, step 3, then die while writing the end of epoch 1
                real_write(self, data[: len(data) // 2])
                raise Killed
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", dying_write)
    with pytest.raises(Killed):
        train(_cfg(tmp_path, "killed", **RESUME_KW))
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert calls["n"] == 3
    assert _final_state(tmp_path / "killed")["state"]["step"] == 3
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".tmp-")]
    assert main(["train", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0
    res = json.loads((tmp_path / "killed" / "results.json").read_text())
    _assert_same_run(*reference, tmp_path / "killed", res)


def test_resume_refuses_changed_config(tmp_path, capsys):
    cfg = _cfg(tmp_path, epochs=1, steps_per_epoch=2)
    train(cfg)
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.1"]) == 2
    assert "cannot change lr when resuming" in capsys.readouterr().err
    with pytest.raises(RepnetError, match="already holds a run"):
        train(_cfg(tmp_path, epochs=1, steps_per_epoch=2))


# ----------------------------------------------------------------------------- NaN
def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    def poison(info):  # from step 3 on, the model outputs NaN
        if info["step"] == 3:
            info["model"].head.register_forward_hook(lambda m, i, out: out * float("nan"))

    cfg = _cfg(tmp_path, checkpoint_every=2)
    with pytest.raises(RepnetError) as e:
        train(cfg, on_step=poison)
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    assert str(e.value) == f"loss became nan at epoch 1 step 4; last good checkpoint: {ckpt_path}"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_absurd_lr_is_refused_before_anything_is_written(tmp_path, capsys):
    for lr in ("1e30", "1e9", "2"):
        code = main(["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init",
                     "--memory", "vanilla", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                     "--steps-per-epoch", "30", "--workers", "0", "--lr", lr, "--quiet", "--no-profile",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "is absurd" in err, err
        assert not (tmp_path / "run").exists()


def test_a_diverging_run_writes_no_non_finite_tensor(tmp_path, capsys):
    """Weights that become NaN mid-run (a divergence within the accepted rates): one line, the last good
    checkpoint kept and finite, no adapter and no results written."""
    from repnet.storage import load_checkpoint, non_finite

    def diverge(info):
        if info["step"] == 2:
            with torch.no_grad():
                next(p for p in info["model"].parameters() if p.requires_grad).fill_(float("nan"))

    cfg = _cfg(tmp_path, epochs=2, steps_per_epoch=3, checkpoint_every=1)
    with pytest.raises(RepnetError) as e:
        train(cfg, on_step=diverge)
    msg = str(e.value)
    assert "\n" not in msg and ("non-finite" in msg or "became nan" in msg), msg
    run = tmp_path / "run"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["state"]["step"] == 1 and non_finite(ckpt) is None
    assert not (run / "adapter").exists() and not (run / "results.json").exists()
    code = main(["train", "--resume", str(run), "--quiet"])  # the last good checkpoint resumes
    assert code == 0 and (run / "results.json").is_file()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'; choose from:"),
    (["--method", "nope"], "unknown method 'nope'; choose from:"),
    (["--backbone", "nope"], "unknown backbone 'nope'; choose from:"),
    (["--dataset", "fashion_mnist", "--data-root", "/nonexistent/fmnist"], "Fashion-MNIST not found"),
    (["--dataset", "flowers102"], "is not on this machine"),
    (["--set", "epochs"], "--set expects key=value"),
    (["--opt", "connector=sideways"], "option connector='sideways' is not valid"),
    (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    code = main(["train", "--random-init", "--image-size", "32", "--epochs", "1", "--workers", "0", "--quiet",
                 "--memory", "vanilla", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(RepnetError, match="no checkpoint.pt"):
        train(TrainConfig(lr=1e-3, lr_side=1e-3, label_smoothing=0.1), resume=str(tmp_path))


@pytest.mark.parametrize("select", ["val", "test"])
def test_select_best_epoch_is_opt_in_and_labelled(tmp_path, select):
    res = train(_cfg(tmp_path, epochs=2, steps_per_epoch=2, select_best_on=select))
    assert res["selected_on"] == select and res["selected_epoch"] in (1, 2)
    assert 0 <= res["test_accuracy"] <= 1 and 0 <= res["final_test_accuracy"] <= 1
    assert ("note" in res) == (select == "test")  # selecting on the test set is flagged as optimistic
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(("test_accuracy" in r) == (select == "test") for r in log)  # val: test read only at the end




