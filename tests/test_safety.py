"""No file a user hands us runs code, and damaged files are caught: every path that reads one.

The payload is a real pickle whose ``__reduce__`` calls ``exec``: loading it with plain
``pickle`` / ``torch.load(weights_only=False)`` writes a marker file. Each reader must refuse it
with one :class:`RepnetError` line (CLI: one ``error:`` line, exit 2), and the marker must not
appear.
"""
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

import repnet
from repnet import RepnetError
from repnet.cli import main
from repnet.storage import (content_digest, load_checkpoint, read_safetensors, restricted_unpickle,
                            save_checkpoint, save_tensors)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_pickle(path, marker, wrap=lambda p: p):
    with open(path, "wb") as f:
        pickle.dump(wrap(_Payload(marker)), f)


def _evil_torch(path, marker):
    """A ``torch.save`` zip whose data.pkl runs code (what a crafted checkpoint looks like)."""
    torch.save({"model": {}, "x": _Payload(marker)}, path)


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    assert "weights_only=False" not in msg
    return msg


def test_the_payload_really_runs_code_when_unpickled_naively(tmp_path):
    """Guard for the tests below: the payload is live, so its absence there means something."""
    _evil_pickle(tmp_path / "p.pkl", tmp_path / "marker")
    with open(tmp_path / "p.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "marker").read_text() == "pwned"


# ----------------------------------------------------------------------------- each file-taking path
def test_cifar_batches_go_through_the_restricted_unpickler(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    _evil_pickle(base / "batches.meta", tmp_path / "marker", wrap=lambda p: {"label_names": p})
    from repnet.data import build_datasets

    with pytest.raises(RepnetError) as e:
        build_datasets("cifar10", data_root=tmp_path)
    assert "refused" in _one_line(e) and not (tmp_path / "marker").exists()
    # a payload inside a data batch too
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    for b in range(1, 6):
        _evil_pickle(base / f"data_batch_{b}", tmp_path / "marker",
                     wrap=lambda p: {"labels": [0], "data": np.zeros((1, 3072), np.uint8), "x": p})
    with pytest.raises(RepnetError) as e:
        build_datasets("cifar10", data_root=tmp_path)
    _one_line(e)
    assert not (tmp_path / "marker").exists()


def test_restricted_unpickler_reads_real_cifar_style_pickles(tmp_path):
    """Protocol 2 (python-2 style, as the real files) and the current protocol both load."""
    obj = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2], "batch_label": "b",
           "f": 1.5, "t": (1, None, True)}
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"p{proto}"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=proto)
        got = restricted_unpickle(path)
        assert np.array_equal(got["data"], obj["data"]) and got["labels"] == [1, 2] and got["t"] == (1, None, True)
    with open(tmp_path / "obj", "wb") as f:  # object arrays are refused (they can hold anything)
        pickle.dump({"data": np.array([1, "a"], dtype=object)}, f)
    with pytest.raises(RepnetError, match="object arrays"):
        restricted_unpickle(tmp_path / "obj")


def test_weights_file_with_code_is_refused(tmp_path):
    _evil_torch(tmp_path / "w.pth", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        repnet.get_model("proxylessnas_mobile", "last", 10, image_size=32, pretrained=str(tmp_path / "w.pth"))
    assert "refused" in _one_line(e) and not (tmp_path / "marker").exists()


def _tiny_train(tmp_path, name):
    from repnet.training import make_config, train

    cfg = make_config(dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, method="last",
                           memory="vanilla", image_size=32, epochs=1, steps_per_epoch=2, workers=0,
                           progress=False, profile_memory=False, out_dir=str(tmp_path / name)))
    train(cfg)
    return tmp_path / name


def test_train_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    run = _tiny_train(tmp_path, "run")
    _evil_torch(run / "checkpoint.pt", tmp_path / "marker")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "refused" in err
    assert not (tmp_path / "marker").exists()


def test_federated_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    out = tmp_path / "fl"
    out.mkdir()
    _evil_torch(out / "checkpoint.pt", tmp_path / "marker")
    code = main(["federated", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--clients", "2",
                 "--rounds", "1", "--out", str(out), "--resume", "--quiet", "--set", "random_init=true",
                 "--set", "image_size=32", "--set", "workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "refused" in err
    assert not (tmp_path / "marker").exists()


def test_adapter_and_multitask_files_with_code_are_refused(tmp_path):
    model = repnet.get_model("proxylessnas_mobile", "repnet", 5, image_size=32, pretrained=False)
    model.save_pretrained(str(tmp_path / "adapter"))
    _evil_pickle(tmp_path / "adapter" / "adapter.safetensors", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        repnet.from_pretrained(str(tmp_path / "adapter"))
    _one_line(e)
    from repnet.continual import MultiTaskModel

    mt = MultiTaskModel("proxylessnas_mobile", image_size=32, pretrained=False)
    mt.add_task("a", 3, method="last")
    mt.save(tmp_path / "mt")
    task_file = next((tmp_path / "mt" / "tasks").glob("*.safetensors"))
    _evil_pickle(task_file, tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        MultiTaskModel.load(tmp_path / "mt")
    _one_line(e)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("method", ["last", "hyblearn"])
def test_continual_resume_refuses_files_with_code(tmp_path, capsys, monkeypatch, method):
    """``repnet continual --resume``: a crafted task file, backbone file or Hyb-Learn state."""
    from repnet.continual import MultiTaskModel

    real, calls = MultiTaskModel.save, {"n": 0}

    def crash_on_second(self, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, directory)

    out = tmp_path / "cl"
    args = ["continual", "--tasks", "digits,mnist5k", "--method", method, "--backbone", "proxylessnas_mobile",
            "--random-init", "--image-size", "32", "--epochs", "1", "--train-subset", "32", "--test-subset", "16",
            "--batch-size", "16", "--workers", "0", "--quiet", "--out", str(out)]
    if method == "hyblearn":
        args += ["--opt", "score_batches=1"]
    monkeypatch.setattr(MultiTaskModel, "save", crash_on_second)
    assert main(args) != 0  # interrupted while saving the second task
    monkeypatch.setattr(MultiTaskModel, "save", real)
    files = [*(out / "model" / "tasks").glob("*.safetensors"), *(out / "model").glob("backbone-*.safetensors"),
             *out.glob("hyblearn-state-*.safetensors")]
    assert len(files) == (3 if method == "hyblearn" else 1)
    for f in files:
        good = f.read_bytes()
        _evil_pickle(f, tmp_path / "marker")
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and f.name in err, err
        f.write_bytes(good)
    assert not (tmp_path / "marker").exists()


def test_exported_program_file_with_code_is_refused(tmp_path):
    from repnet.export import load_exported

    _evil_torch(tmp_path / "model.pt2", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        load_exported(tmp_path / "model.pt2")
    _one_line(e)
    assert not (tmp_path / "marker").exists()


def test_no_weights_only_false_in_the_package():
    from pathlib import Path

    src = Path(repnet.__file__).parent
    offenders = [str(p) for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


# ----------------------------------------------------------------------------- integrity
def _flip(path, where, n=64):
    data = bytearray(path.read_bytes())
    for i in range(where, where + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_tensor_are_detected(tmp_path):
    w = torch.arange(4096, dtype=torch.float32)
    save_checkpoint({"model": {"w": w}, "step": 3}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], w)
    with zipfile.ZipFile(tmp_path / "c.pt") as z:  # find where the tensor's bytes lie in the zip
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    _flip(tmp_path / "c.pt", info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000)
    with pytest.raises(RepnetError, match="damaged") as e:
        load_checkpoint(tmp_path / "c.pt")
    _one_line(e)


def test_flipped_bytes_in_an_adapter_are_detected_and_export_refuses(tmp_path):
    model = repnet.get_model("proxylessnas_mobile", "repnet", 5, image_size=32, pretrained=False)
    model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    _flip(path, 8 + header + 200)
    with pytest.raises(RepnetError, match="damaged") as e:
        repnet.from_pretrained(str(tmp_path / "adapter"))
    _one_line(e)


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


def test_torn_log_line_does_not_break_resume(tmp_path):
    run = _tiny_train(tmp_path, "run")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "tra')
    from repnet.training import _truncate_log

    _truncate_log(run / "log.jsonl", 1)
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


# ----------------------------------------------------------------------------- Ctrl-C, run folders, exports
def test_ctrl_c_writes_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    import os
    import signal

    from repnet.errors import Interrupted
    from repnet.training import make_config, resume_config, train

    kw = dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, method="repnet", memory="vanilla",
              image_size=32, epochs=2, steps_per_epoch=4, workers=0, progress=False, profile_memory=False,
              augment="basic")
    train(make_config({**kw, "out_dir": str(tmp_path / "ref")}))

    def ctrl_c(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="continue with: repnet train --resume"):
        train(make_config({**kw, "out_dir": str(tmp_path / "cut")}), on_step=ctrl_c)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]["step"] == 3
    train(resume_config(tmp_path / "cut"), resume=str(tmp_path / "cut"))
    a = read_safetensors(tmp_path / "ref" / "adapter" / "adapter.safetensors")
    b = read_safetensors(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_on_a_folder_of_the_users_is_refused_and_left_untouched(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text("my: own\n")
    (user / "results.json").write_text('{"mine": 1}')
    code = main(["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init", "--image-size",
                 "32", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--quiet", "--no-profile",
                 "--out", str(user)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "not empty" in err and "\n" not in err
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "results.json"]
    assert (user / "config.yaml").read_text() == "my: own\n" and (user / "results.json").read_text() == '{"mine": 1}'


def test_exported_onnx_copied_alone_to_another_folder_runs(tmp_path):
    import shutil

    pytest.importorskip("onnxruntime")
    from repnet.export import export_model, load_exported

    model = repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=32, pretrained=False)
    rep = export_model(model, tmp_path / "a" / "model.onnx")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.onnx"]
    assert rep["bytes"] == (tmp_path / "a" / "model.onnx").stat().st_size
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx")
    shutil.rmtree(tmp_path / "a")
    out = load_exported(tmp_path / "b" / "model.onnx")(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- data scanning
def test_symlink_loop_in_an_image_folder_is_walked_once(tmp_path):
    import os

    from PIL import Image

    from repnet.data.imagefolder import load_split_folders

    for split in ("train", "val"):
        for ci, c in enumerate(("a", "b")):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (40 * i, 100 * ci, 0)).save(d / f"{i}.png")
    os.symlink(tmp_path / "train", tmp_path / "train" / "a" / "loop")  # a -> .. -> a -> ...
    train, test = load_split_folders(tmp_path, verify=False)
    assert len(train) == 10 and sorted(np.bincount(train.targets).tolist()) == [5, 5]
    assert len(test) == 10


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from repnet.data.core import to_rgb

    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63,000 of 65,535
    Image.fromarray(a).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].max() == round(63000 / 65535 * 255) and rgb[0, 1, 0] == round(1000 / 65535 * 255)
    assert (rgb[..., 0] == 255).mean() == 0  # PIL's convert("RGB") makes 98% of these pixels white


def test_overwrite_replaces_only_an_earlier_run_of_the_same_kind(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init", "--image-size",
            "32", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--quiet", "--no-profile"]
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


def test_overwrite_never_replaces_a_run_of_another_kind(tmp_path, capsys):
    """A finished federated run's folder is refused by `repnet train --overwrite` (it used to be replaced)."""
    fl = tmp_path / "fl"
    assert main(["federated", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--method", "last",
                 "--clients", "2", "--rounds", "1", "--quiet", "--out", str(fl), "--set", "random_init=true",
                 "--set", "image_size=32", "--set", "workers=0", "--set", "train_subset=64",
                 "--set", "test_subset=16"]) == 0
    before = {p.name: p.read_bytes() for p in fl.iterdir() if p.is_file()}
    capsys.readouterr()
    train = ["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init", "--image-size",
             "32", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--quiet", "--no-profile"]
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


def test_a_run_killed_before_its_first_checkpoint_restarts_with_overwrite(tmp_path, capsys, monkeypatch):
    import repnet.training as training

    args = ["train", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--random-init", "--image-size",
            "32", "--epochs", "1", "--steps-per-epoch", "1", "--workers", "0", "--quiet", "--no-profile"]
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


def test_flower_app_never_replaces_a_file_it_did_not_write(tmp_path):
    from repnet.errors import RepnetError
    from repnet.federated import write_app

    tiny = {"dataset": "digits", "backbone": "proxylessnas_mobile", "method": "last", "random_init": True}
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    with pytest.raises(RepnetError, match="not written by repnet"):
        write_app(str(app), tiny)
    assert (app / "pyproject.toml").read_text() == "[project]\nname = 'mine'\n"
    ours = tmp_path / "ours"
    first = write_app(str(ours), tiny, rounds=2).read_text()
    assert "num-server-rounds = 2" in first
    assert "num-server-rounds = 3" in write_app(str(ours), tiny, rounds=3).read_text()  # ours, unchanged: rewritten
    (ours / "pyproject.toml").write_text((ours / "pyproject.toml").read_text() + "# my edit\n")
    with pytest.raises(RepnetError, match="edited since"):
        write_app(str(ours), tiny, rounds=4)
    assert (ours / "pyproject.toml").read_text().endswith("# my edit\n")
