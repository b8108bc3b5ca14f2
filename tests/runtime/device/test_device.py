"""repnet-device (the C++ trainer in device/, repnet.runtime.device): on the same program and inputs
its first step's loss and every trained gradient equal the Python runtime's bit for bit, 20 SGD steps
track the Python runtime's SGD, its optimizers equal torch.optim on the same gradients, it trains
digits to >= 0.80 from `repnet train --runtime device` with an adapter eager PyTorch reloads, a run
killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, and every bad input is one
line and exit status 2."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import repnet
from repnet.cli import main
from repnet.storage import read_safetensors

pytest.importorskip("executorch")

from executorch.extension.training import _load_for_executorch_for_training_from_buffer  # noqa: E402

from repnet.runtime.executorch.trainer import RuntimeTrainer
from repnet.runtime.executorch.program import export_training_program, program_build  # noqa: E402
from repnet.runtime.device import files  # noqa: E402
from repnet.runtime.device.runner import find_binary  # noqa: E402

BATCH, SIZE, CLASSES, IMAGES = 2, 32, 4, 16


def _bin() -> str:
    return str(find_binary())  # CI: scripts/setup.sh builds it (a missing build fails here, never skips)


def _run(*args, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([_bin(), *map(str, args)], capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _events(p) -> list[dict]:
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def _bad(*args, match: str, **kw) -> str:
    """The trainer refuses: exit 2 and one line on stderr naming the problem."""
    p = _run(*args, check=False, **kw)
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    """Rep-Net (GroupNorm modules) on a random-init MobileNetV2 at 32 px, batch 2, with its metadata
    (SGD, momentum 0.9, constant lr) and a packed set of 16 random images. The program runs repnet's
    kernels (the default): this process loads their library, as the C++ trainer links it."""
    from repnet.runtime.executorch.kernels import load_kernels

    load_kernels()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("device")
    model = repnet.get_model("mobilenet_v2", "repnet", CLASSES, image_size=SIZE, pretrained=False,
                             **program_build("repnet")).eval()
    with torch.no_grad():  # every gradient non-trivial (Rep-Net's last norms start at gamma = 0)
        model.head[-1].weight.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1, 0.1)
    program = export_training_program(model, BATCH, SIZE, label_smoothing=0.1, evaluate=True)
    sgd = {"name": "sgd", "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
    meta = files.program_metadata(model, program, lr=0.05, lr_side=0.1, optimizer=sgd, total_steps=20,
                                  schedule="constant", label_smoothing=0.1)
    pte, meta_path = files.write_program(folder, program, meta)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(IMAGES, 3, SIZE, SIZE, generator=g)
    labels = torch.randint(0, CLASSES, (IMAGES,), generator=g)
    data = folder / "train.rpd"
    files.write_dataset(list(zip(images, labels)), data, CLASSES, hflip=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"folder": folder, "pte": pte, "meta": meta_path, "program": program, "model": model, "state": state,
            "images": images, "labels": labels, "data": data, "metadata": meta}


def _with_meta(prog, tmp_path, **changes) -> Path:
    """A copy of the program whose metadata has ``changes``."""
    pte = tmp_path / "p.pte"
    shutil.copy(prog["pte"], pte)
    meta = {**prog["metadata"], **changes, "program": {**prog["metadata"]["program"], "file": "p.pte"}}
    (tmp_path / "p.json").write_text(json.dumps(meta))
    return pte


def test_ctest_unit_tests_pass():
    """The C++ unit tests (optimizers, dataset reader, checksums), as CTest runs them."""
    build = Path(_bin()).parent
    ctest = shutil.which("ctest", path=str(Path(sys.executable).parent)) or shutil.which("ctest")
    p = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure", "-LE", "e2e"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "100% tests passed" in p.stdout, p.stdout + p.stderr


def test_dataset_file_round_trips_and_is_checked(prog, tmp_path):
    images, labels = files.read_dataset(prog["data"])
    assert torch.equal(images, prog["images"]) and torch.equal(labels, prog["labels"])
    head = files.read_dataset_header(prog["data"])
    assert (head["count"], head["channels"], head["height"], head["num_classes"], head["hflip"]) == \
        (IMAGES, 3, SIZE, CLASSES, True)
    raw = bytearray(prog["data"].read_bytes())
    raw[-1] ^= 1
    (tmp_path / "bad.rpd").write_bytes(bytes(raw))
    with pytest.raises(repnet.RepnetError, match="damaged"):
        files.read_dataset(tmp_path / "bad.rpd")


def test_first_step_loss_and_gradients_equal_the_python_runtime_bit_for_bit(prog, tmp_path):
    out = tmp_path / "g.safetensors"
    _run("gradients", "--program", prog["pte"], "--data", prog["data"], "--out", out)
    got = read_safetensors(out, require_digest=True)  # (the digest as repnet.storage computes it)
    mod = _load_for_executorch_for_training_from_buffer(prog["program"].buffer)
    x, y = prog["images"][:BATCH].contiguous(), prog["labels"][:BATCH].contiguous()
    loss, logits = mod.forward_backward("forward", (x, y))
    assert torch.equal(got["loss"], loss.reshape(())) and torch.equal(got["logits"], logits)
    grads = mod.named_gradients()
    assert len(prog["program"].trainable) > 50
    for name in prog["program"].trainable:
        ref = grads[f"model.{name}"]
        assert ref.abs().max() > 0, name
        assert torch.equal(got[f"grad.{name}"], ref), name
    # the evaluation method: the same logits from the forward alone
    torch.testing.assert_close(got["eval_logits"], logits, rtol=1e-5, atol=1e-5)


def test_twenty_sgd_steps_track_the_python_runtime(prog, tmp_path):
    out = tmp_path / "run"
    _run("train", "--program", prog["pte"], "--train", prog["data"], "--out", out, "--sequential", "--epochs", 3,
         "--max-steps", 20, "--no-checkpoint", "--quiet-steps", "--threads", 0)
    model = repnet.get_model("mobilenet_v2", "repnet", CLASSES, image_size=SIZE, pretrained=False,
                             **program_build("repnet")).eval()
    model.load_state_dict(prog["state"])
    trainer = RuntimeTrainer(model, prog["program"], lr=0.05, lr_side=0.1, momentum=0.9)  # ExecuTorch's SGD
    steps_per_epoch = IMAGES // BATCH
    for s in range(20):
        i = (s % steps_per_epoch) * BATCH
        trainer.step(prog["images"][i:i + BATCH], prog["labels"][i:i + BATCH])
    adapter = read_safetensors(out / "adapter" / "adapter.safetensors", require_digest=True)
    assert set(adapter) == set(prog["program"].trainable)
    moved = 0
    for name, ref in model.trainable_state_dict().items():
        got = adapter[name]
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-7, name
        moved += not torch.equal(got, prog["state"][name])
    assert moved > 50  # the steps really changed the weights


def _replay(tmp_path, spec: dict, params: dict, grads: list[dict]) -> dict:
    tensors = {f"p.{k}": v for k, v in params.items()}
    for s, g in enumerate(grads):
        tensors.update({f"g.{s}.{k}": v for k, v in g.items()})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "in.safetensors"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = subprocess.run([str(Path(_bin()).parent / "optim_replay"), str(tmp_path / "spec.json"),
                        str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = read_safetensors(tmp_path / "out.safetensors", require_digest=True)
    return {k.removeprefix("p."): v for k, v in out.items()}


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd_nesterov", "sgd_dampening"])
def test_optimizers_equal_torch_optim_on_the_same_gradients(tmp_path, kind):
    """Two parameter groups, the cosine schedule with warm-up, clipping, weight decay: 30 steps."""
    g = torch.Generator().manual_seed(3)
    params = {"a.weight": torch.randn(7, 5, generator=g), "b.bias": torch.randn(11, generator=g)}
    lrs = {"a.weight": 3e-3, "b.bias": 1e-2}
    steps, warm = 30, 5
    grads = [{k: torch.randn(v.shape, generator=g) * (0.1 + s % 4) for k, v in params.items()} for s in range(steps)]
    spec_opt = {"adamw": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05},
                "adam": {"name": "adam", "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01},
                "sgd_nesterov": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
                "sgd_dampening": {"name": "sgd", "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.0}}[kind]
    spec = {"optimizer": spec_opt, "schedule": {"name": "cosine", "total_steps": steps, "warmup_steps": warm},
            "clip_grad_norm": 4.0, "steps": steps, "tensors": [{"name": k, "lr": lrs[k]} for k in params]}
    got = _replay(tmp_path, spec, params, grads)
    ref = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    groups = [{"params": [ref[k]], "lr": lrs[k]} for k in params]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    elif kind == "adam":
        opt = torch.optim.Adam(groups, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    elif kind == "sgd_nesterov":
        opt = torch.optim.SGD(groups, lr=1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        opt = torch.optim.SGD(groups, lr=1, momentum=0.8, dampening=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: files.cosine_factor(s, steps, warm))
    clipped = 0
    for s in range(steps):
        for k, p in ref.items():
            p.grad = grads[s][k].clone()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 4.0)
        clipped += bool(norm > 4.0)
        opt.step()
        sched.step()
    assert 0 < clipped < steps  # clipping was exercised, and not on every step
    for k in params:
        want = ref[k].detach()
        assert not torch.equal(want, params[k])
        assert float((got[k] - want).abs().max()) <= 1e-6 * float(want.abs().max()), (k, kind)


def test_kill_9_then_resume_ends_bit_identical(prog, tmp_path):
    """Adam, shuffled order with flips, a checkpoint every step; SIGKILL mid-run, then --resume."""
    adam = {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    pte = _with_meta(prog, tmp_path, optimizer=adam, schedule={"name": "cosine", "total_steps": 24, "warmup_steps": 0})
    common = ["--program", pte, "--train", prog["data"], "--epochs", 3, "--seed", 5, "--checkpoint-every", 1]
    _run("train", *common, "--out", tmp_path / "whole", "--quiet-steps")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([_bin(), "train", *map(str, common), "--out", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill once a few steps are checkpointed, while it keeps training
        ev = json.loads(line)
        if ev["event"] == "checkpoint" and ev["step"] >= 9:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists()
    p = _run("train", *common, "--out", killed, "--resume")
    start = _events(p)[0]
    assert start["event"] == "start" and start["resumed"] and 9 <= start["step"] < 24
    a = (tmp_path / "whole" / "adapter" / "adapter.safetensors").read_bytes()
    b = (killed / "adapter" / "adapter.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "whole" / "checkpoint.rdc").read_bytes()[:-32] != b""  # (a real checkpoint)
    _bad("train", *common, "--out", killed, match="already holds a run")  # without --resume: refused
    # SIGINT (Ctrl-C): the step finishes, a checkpoint is written, exit status 3; resumed: the same adapter
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([_bin(), "train", *map(str, common), "--out", str(stopped)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if json.loads(line)["event"] == "step":
            proc.send_signal(signal.SIGINT)
            break
    rest = [json.loads(line) for line in proc.stdout]
    proc.wait()
    assert proc.returncode == 3 and rest[-1]["event"] == "interrupted", (proc.returncode, rest[-1:])
    assert "--resume" in proc.stderr.read()
    _run("train", *common, "--out", stopped, "--resume", "--quiet-steps")
    assert (stopped / "adapter" / "adapter.safetensors").read_bytes() == a


def _checkpoint_with_program_sha(raw: bytes, sha: str) -> bytes:
    import hashlib

    body = bytearray(raw[:-32])
    n = int.from_bytes(body[16:20], "little")
    assert n == 64
    body[20:84] = sha.encode()
    return bytes(body) + hashlib.sha256(bytes(body)).digest()


def test_bad_inputs_are_one_line_and_exit_2(prog, tmp_path):
    base = ["--train", prog["data"], "--epochs", 1, "--quiet-steps"]
    _bad("train", "--program", tmp_path / "missing.pte", *base, "--out", tmp_path / "o0", match="not found")
    # truncated: the metadata's checksum catches it; with a matching checksum the runtime's loader does
    cut = tmp_path / "cut.pte"
    cut.write_bytes(prog["pte"].read_bytes()[:100_000])
    shutil.copy(prog["meta"], tmp_path / "cut.json")
    _bad("train", "--program", cut, *base, "--out", tmp_path / "o1", match="does not match its metadata")
    import hashlib

    for name, content in (("cut2", prog["pte"].read_bytes()[:100_000]), ("foreign", os.urandom(50_000))):
        pte = tmp_path / f"{name}.pte"
        pte.write_bytes(content)
        meta = {**prog["metadata"], "program": {**prog["metadata"]["program"],
                                                "sha256": hashlib.sha256(content).hexdigest()}}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        _bad("train", "--program", pte, *base, "--out", tmp_path / f"o-{name}", match="not a valid ExecuTorch program")
    (tmp_path / "text.json").write_text("{not json")
    shutil.copy(prog["pte"], tmp_path / "text.pte")
    _bad("train", "--program", tmp_path / "text.pte", *base, "--out", tmp_path / "o2", match="not valid JSON")
    # datasets of another image size / class count, and a damaged one
    g = torch.Generator().manual_seed(0)
    small = tmp_path / "small.rpd"
    files.write_dataset([(torch.randn(3, 16, 16, generator=g), 0)] * 4, small, CLASSES)
    _bad("train", "--program", prog["pte"], "--train", small, "--out", tmp_path / "o3", match="3 x 16 x 16 images")
    five = tmp_path / "five.rpd"
    files.write_dataset([(torch.randn(3, SIZE, SIZE, generator=g), 1)] * 4, five, 5)
    _bad("train", "--program", prog["pte"], "--train", five, "--out", tmp_path / "o4", match="has 5 classes")
    raw = bytearray(prog["data"].read_bytes())
    raw[-5] ^= 0x10
    (tmp_path / "damaged.rpd").write_bytes(bytes(raw))
    _bad("train", "--program", prog["pte"], "--train", tmp_path / "damaged.rpd", "--out", tmp_path / "o5",
         match="damaged")
    (tmp_path / "short.rpd").write_bytes(bytes(raw[:-7]))
    _bad("train", "--program", prog["pte"], "--train", tmp_path / "short.rpd", "--out", tmp_path / "o5b",
         match="truncated")
    # a run to resume from (paused after 2 of 6 steps); then a checkpoint of another program, a damaged one,
    # and other limits
    run = tmp_path / "run"
    plan = ["--max-steps", 6]
    _run("train", "--program", prog["pte"], *base, *plan, "--out", run, "--stop-after", 2)
    ckpt = run / "checkpoint.rdc"
    good = ckpt.read_bytes()
    ckpt.write_bytes(_checkpoint_with_program_sha(good, "0" * 64))
    _bad("train", "--program", prog["pte"], *base, *plan, "--out", run, "--resume", match="belongs to another program")
    ckpt.write_bytes(good[:-40] + bytes(8) + good[-32:])
    _bad("train", "--program", prog["pte"], *base, *plan, "--out", run, "--resume", match="damaged")
    ckpt.write_bytes(good)
    _bad("train", "--program", prog["pte"], *base, "--max-steps", 5, "--out", run, "--resume",
         match="data or limits changed")
    # a non-finite loss: refused before any update; the step-0 checkpoint stays the last good one
    nan = tmp_path / "nan.rpd"
    bad_img = torch.randn(3, SIZE, SIZE, generator=g)
    bad_img[0, 0, 0] = float("nan")
    files.write_dataset([(bad_img, 0)] * 4, nan, CLASSES)
    err = _bad("train", "--program", prog["pte"], "--train", nan, "--out", tmp_path / "o6", "--sequential",
               match="non-finite")
    assert "last good checkpoint" in err and (tmp_path / "o6" / "checkpoint.rdc").is_file()
    # a full disk (a file-size limit below the checkpoint's size): exit 2, the last checkpoint as it was
    # and no temporary file left
    before = ckpt.read_bytes()
    limit = len(before) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    err = _bad("train", "--program", prog["pte"], *base, *plan, "--out", run, "--resume", "--checkpoint-every", 1,
               match="cannot write", preexec_fn=small_files)
    assert "last good checkpoint" in err
    assert ckpt.read_bytes() == before and not list(run.glob(".tmp-*"))
    # unknown options and missing values are one line too
    _bad("train", "--program", prog["pte"], "--bogus", match="unknown option --bogus")
    _bad("train", "--program", prog["pte"], "--train", prog["data"], "--out", tmp_path / "o7", "--epochs", "x",
         match="whole number")


def test_repnet_train_runtime_device_learns_digits_and_the_adapter_reloads(tmp_path, capsys):
    """The issue's command: Rep-Net, the digits recipe (Adam, lr / lr_side, cosine per step, label smoothing)."""
    out = tmp_path / "run"
    t0 = time.time()
    assert main(["--threads", "1", "train", "--runtime", "device", "--dataset", "digits", "--image-size", "32",
                 "--epochs", "2", "--workers", "0", "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    wall = time.time() - t0
    res = json.loads((out / "results.json").read_text())
    assert res["runtime"] == "device" and res["method"] == "repnet" and res["optimizer"]["name"] == "adam"
    assert res["schedule"]["name"] == "cosine" and res["schedule"]["total_steps"] == res["steps"]
    assert res["test_accuracy"] >= 0.80, res["test_accuracy"]
    assert abs(res["eager_test_accuracy"] - res["test_accuracy"]) <= 0.01
    for key in ("peak_rss_mb", "program_arena_mb", "program_weights_mb", "step_time_s", "train_images_per_s"):
        assert res[key] > 0, key
    assert res["peak_rss_mb"] < 200  # no torch in the training process
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["train_loss"] < log[0]["train_loss"]
    # the adapter in eager PyTorch gives the program's logits, with the trained weights
    model = repnet.from_pretrained(str(out / "adapter"), memory="vanilla").eval()
    assert model.options.norm == "group" and model.frozen_bits == "linear"
    dump = tmp_path / "logits.safetensors"
    _run("gradients", "--program", out / "program.pte", "--data", out / "test.rpd", "--checkpoint",
         out / "checkpoint.rdc", "--out", dump)
    got = read_safetensors(dump)
    images, _ = files.read_dataset(out / "test.rpd")
    with torch.no_grad():
        eager = model(images[:8])
    torch.testing.assert_close(got["logits"], eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["eval_logits"], eager, rtol=1e-5, atol=1e-5)
    print(f"repnet train --runtime device (digits, 32 px, 2 epochs): {wall:.0f} s wall, "
          f"test accuracy {res['test_accuracy']:.3f}, peak RSS {res['peak_rss_mb']:.1f} MB")
    # resuming a finished run trains nothing and ends with the same adapter
    before = (out / "adapter" / "adapter.safetensors").read_bytes()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == before


def test_repnet_train_runtime_device_refuses_what_it_cannot_do(tmp_path, capsys, monkeypatch):
    args = ["train", "--runtime", "device", "--dataset", "digits", "--image-size", "32", "--quiet"]
    assert main([*args, "--int8", "--out", str(tmp_path / "a")]) == 2
    assert "not supported with --runtime device" in capsys.readouterr().err
    monkeypatch.setenv("REPNET_DEVICE_BIN", str(tmp_path / "nowhere"))
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "device trainer is not built" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # nothing written before the binary is found


def test_export_training_with_a_dataset_writes_what_the_device_trains(tmp_path, capsys):
    """`repnet export --training --dataset`: program + metadata (the dataset's recipe) + packed splits."""
    pte = tmp_path / "digits.pte"
    assert main(["export", "--training", "--backbone", "mobilenet_v2", "--method", "last", "--dataset", "digits",
                 "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--out", str(pte)]) == 0, \
        capsys.readouterr().err
    assert "digits-train.rpd" in capsys.readouterr().out
    meta = json.loads((tmp_path / "digits.json").read_text())
    assert meta["optimizer"]["name"] == "adam" and meta["label_smoothing"] == 0.1 and meta["num_classes"] == 10
    assert meta["class_names"][:2] == ["0", "1"] and meta["train"]["epochs"] == 1
    assert [t["name"] for t in meta["trainable"]] == ["head.1.weight", "head.1.bias"]
    assert {t["lr"] for t in meta["trainable"]} == {3e-4} and meta["memory"]["eval_arena_bytes"] > 0
    head = files.read_dataset_header(tmp_path / "digits-train.rpd")
    assert (head["height"], head["num_classes"], head["hflip"]) == (32, 10, False)  # digits: no flips
    p = _run("train", "--program", pte, "--train", tmp_path / "digits-train.rpd", "--test",
             tmp_path / "digits-test.rpd", "--out", tmp_path / "run", "--max-steps", 3, "--quiet-steps")
    ev = {e["event"]: e for e in _events(p)}
    assert ev["plan"]["total_steps"] == 3 and ev["eval"]["images"] == files.read_dataset_header(
        tmp_path / "digits-test.rpd")["count"]
    assert ev["end"]["train_peak_rss_mb"] <= ev["end"]["peak_rss_mb"] < 100
    model = repnet.from_pretrained(str(tmp_path / "run" / "adapter"), memory="vanilla")
    assert model.method == "last" and model.num_classes == 10


def test_the_documented_data_order_is_the_one_the_device_uses():
    """docs/device.md's RNG, implemented in Python from its description, gives the C++ order and flips."""
    for seed, epoch, n in ((0, 0, 1), (5, 2, 37), (2**40 + 3, 7, 1000)):
        ev = _events(_run("order", "--seed", seed, "--epoch", epoch, "--count", n))[0]
        order, flips = files.device_epoch_order(seed, epoch, n)
        assert ev["order"] == order and [bool(f) for f in ev["flips"]] == flips
    assert sorted(order) == list(range(1000)) and 400 < sum(flips) < 600
