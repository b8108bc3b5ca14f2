"""No file a user hands us runs code, and damaged files are caught: every path that reads one.

The payload is a real pickle whose ``__reduce__`` calls ``exec``: loading it with plain
``pickle`` / ``torch.load(weights_only=False)`` writes a marker file. Each reader must refuse it
with one :class:`RepnetError` line (CLI: one ``error:`` line, exit 2), and the marker must not
appear.
"""
import json
import pickle
import zipfile

import pytest
import torch

import repnet
from repnet import RepnetError
from repnet.cli import main
from repnet.config.recipes import make_config
from repnet.storage import (content_digest, load_checkpoint, read_safetensors, save_checkpoint,
                            save_tensors)
from tests.helpers import evil_pickle, flip_bytes, one_line










def test_the_payload_really_runs_code_when_unpickled_naively(tmp_path):
    """Guard for the tests below: the payload is live, so its absence there means something."""
    evil_pickle(tmp_path / "p.pkl", tmp_path / "marker")
    with open(tmp_path / "p.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "marker").read_text() == "pwned"




















def test_no_weights_only_false_in_the_package():
    from pathlib import Path

    src = Path(repnet.__file__).parent
    offenders = [str(p) for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []




def test_flipped_bytes_in_a_checkpoint_tensor_are_detected(tmp_path):
    w = torch.arange(4096, dtype=torch.float32)
    save_checkpoint({"model": {"w": w}, "step": 3}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], w)
    with zipfile.ZipFile(tmp_path / "c.pt") as z:  # find where the tensor's bytes lie in the zip
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    flip_bytes(tmp_path / "c.pt", info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000)
    with pytest.raises(RepnetError, match="damaged") as e:
        load_checkpoint(tmp_path / "c.pt")
    one_line(e)




def test_digest_covers_every_value():
    a = {"model": {"w": torch.zeros(3)}, "history": [{"acc": 0.5}]}
    b = {"model": {"w": torch.zeros(3)}, "history": [{"acc": 0.25}]}
    c = {"model": {"w": torch.zeros(3, dtype=torch.float64)}, "history": [{"acc": 0.5}]}
    assert len({content_digest(a), content_digest(b), content_digest(c)}) == 3
    assert content_digest(a) == content_digest({"model": {"w": torch.zeros(3)}, "history": [{"acc": 0.5}]})


def test_safetensors_roundtrip_and_missing_digest(tmp_path):
    from safetensors.torch import save_file

    t = {"a": torch.randn(3, 4), "b": torch.tensor(7)}
    save_tensors(t, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors", require_digest=True)
    assert all(torch.equal(got[k], t[k]) for k in t)
    save_file(t, str(tmp_path / "y.safetensors"))
    with pytest.raises(RepnetError, match="no checksum"):
        read_safetensors(tmp_path / "y.safetensors", require_digest=True)






def test_out_on_a_folder_of_the_users_is_refused_and_left_untouched(tmp_path, capsys, tiny_train_args):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("my: own\n")
    (user / "results.json").write_text('{"mine": 1}')
    code = main([*tiny_train_args, "--out", str(user)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "not empty" in err and "\n" not in err
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "results.json"]
    assert (user / "config.yaml").read_text() == "my: own\n" and (user / "results.json").read_text() == '{"mine": 1}'








def test_overwrite_replaces_only_an_earlier_run_of_the_same_kind(tmp_path, capsys, tiny_train_args):
    args = tiny_train_args
    run = tmp_path / "run"
    assert main([*args, "--out", str(run)]) == 0
    first = (run / "results.json").read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(run)]) == 2  # a finished run is not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(run), "--overwrite", "--seed", "1"]) == 0
    assert (run / "results.json").read_text() != first and json.loads((run / "results.json").read_text())
    # the user's own files - even with a run's names - are never removed by --overwrite
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("my: own\n")
    (user / "results.json").write_text('{"mine": 1}')
    (user / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main([*args, "--out", str(user), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "notes.txt", "results.json"]
    (run / "notes.txt").write_text("keep")  # a run folder the user added a file to
    assert main([*args, "--out", str(run), "--overwrite"]) == 2
    assert (run / "notes.txt").read_text() == "keep" and (run / "results.json").is_file()
    assert main([*args, "--out", str(run), "--overwrite", "--resume", str(run)]) == 2


def test_continual_and_federated_overwrite(tmp_path, capsys):
    cl = ["continual", "--tasks", "digits", "--method", "last", "--backbone", "proxylessnas_mobile", "--random-init",
          "--image-size", "32", "--epochs", "1", "--train-subset", "32", "--test-subset", "16", "--workers", "0",
          "--quiet", "--out", str(tmp_path / "cl")]
    assert main(cl) == 0
    assert main(cl) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*cl, "--overwrite"]) == 0 and (tmp_path / "cl" / "results.json").is_file()
    fl = ["federated", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--method", "last", "--clients",
          "2", "--rounds", "1", "--quiet", "--out", str(tmp_path / "fl"), "--set", "random_init=true",
          "--set", "image_size=32", "--set", "workers=0", "--set", "train_subset=64", "--set", "test_subset=16"]
    assert main(fl) == 0
    capsys.readouterr()
    assert main(fl) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*fl, "--overwrite"]) == 0


def test_overwrite_never_replaces_a_run_of_another_kind(tmp_path, capsys, tiny_train_args):
    """A finished federated run's folder is refused by `repnet train --overwrite` (it used to be replaced)."""
    fl = tmp_path / "fl"
    assert main(["federated", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--method", "last",
                 "--clients", "2", "--rounds", "1", "--quiet", "--out", str(fl), "--set", "random_init=true",
                 "--set", "image_size=32", "--set", "workers=0", "--set", "train_subset=64",
                 "--set", "test_subset=16"]) == 0
    before = {p.name: p.read_bytes() for p in fl.iterdir() if p.is_file()}
    capsys.readouterr()
    train = tiny_train_args
    assert main([*train, "--out", str(fl), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "federated run" in err
    assert {p.name: p.read_bytes() for p in fl.iterdir() if p.is_file()} == before
    assert (fl / "adapter" / "adapter.safetensors").is_file()
    # a folder of the old layout (no repnet-run.json): the checkpoint's keys tell the kinds apart
    (fl / "repnet-run.json").unlink()
    assert main([*train, "--out", str(fl), "--overwrite"]) == 2
    assert "does not hold a training run" in capsys.readouterr().err
    assert (fl / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_overwrite(tmp_path, capsys, monkeypatch,
                                                                          tiny_train_args):
    import repnet.training.run as training

    args = tiny_train_args
    run = tmp_path / "run"

    def killed(*a, **k):
        raise KeyboardInterrupt  # dies while the data is read, before the step-0 checkpoint
    with monkeypatch.context() as m:
        m.setattr(training, "build_data", killed)
        assert main([*args, "--out", str(run)]) == 130
    assert json.loads((run / "repnet-run.json").read_text()) == {"kind": "run", "state": "started"}
    assert not (run / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main([*args, "--resume", str(run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(run), "--overwrite"]) == 0
    assert json.loads((run / "repnet-run.json").read_text())["state"] == "finished"
    assert (run / "results.json").is_file()




# ----------------------------------------------------------------------------- a full disk during a checkpoint
def _no_temps(folder):
    return [p.name for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch,
                                                                                 tiny_train_args):
    """The disk fills up while the second checkpoint is written (simulated: the write stops half-way with
    ENOSPC): one `error:` line, the step-1 checkpoint intact and resumable, no temporary file left."""
    import errno
    from pathlib import Path

    from repnet.storage import load_checkpoint

    real_write, calls = Path.write_bytes, {"n": 0}

    def full_disk(self, data):
        if self.name.endswith("-checkpoint.pt"):
            calls["n"] += 1
            if calls["n"] == 3:  # step 0, step 1, then the disk is full at step 2
                real_write(self, data[: len(data) // 3])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    run = tmp_path / "run"
    args = [*tiny_train_args[:tiny_train_args.index("--steps-per-epoch")], "--steps-per-epoch", "3",
            *tiny_train_args[tiny_train_args.index("--steps-per-epoch") + 2:], "--checkpoint-every", "1"]
    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", full_disk)
        code = main([*args, "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot write") and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "the previous file is kept" in err
    assert load_checkpoint(run / "checkpoint.pt")["state"]["step"] == 1
    assert _no_temps(run) == []
    assert main(["train", "--resume", str(run), "--quiet"]) == 0 and (run / "results.json").is_file()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MB file system (tmpfs) where this machine lets us mount one (root with CAP_SYS_ADMIN)."""
    import subprocess

    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(folder):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_really_full_disk_during_a_checkpoint(tiny_tmpfs, tiny):
    """On a real full file system: the training checkpoint (our writer) and a library's own writer (torch.save
    into the atomic writer's file, which fails with torch's own RuntimeError) are one line each."""
    from repnet.storage import atomic_write, load_checkpoint
    from repnet.training.run import train

    run = tiny_tmpfs / "run"

    def fill_after_first_step(info):
        if info["step"] == 1:
            _fill(tiny_tmpfs)

    cfg = make_config({**tiny, "method": "last", "memory": "vanilla", "epochs": 1, "steps_per_epoch": 3,
                       "checkpoint_every": 1, "out_dir": str(run)})
    with pytest.raises(RepnetError) as e:
        train(cfg, on_step=fill_after_first_step)
    msg = one_line(e)
    assert "cannot write" in msg and ("No space left" in msg or "no space left" in msg), msg
    assert load_checkpoint(run / "checkpoint.pt")["state"]["step"] == 0 and _no_temps(run) == []
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(RepnetError) as e:
        atomic_write(run / "checkpoint.pt", lambda p: torch.save({"x": torch.zeros(1 << 20)}, p))
    assert "no space left on device" in one_line(e)
    assert (run / "checkpoint.pt").read_bytes() == before and _no_temps(run) == []
