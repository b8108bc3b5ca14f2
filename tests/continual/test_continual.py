"""Multi-domain / continual learning on one frozen backbone (repnet.continual)."""
import json

import pytest
import torch

from repnet import RepnetError
from repnet.backbones import create_backbone
from repnet.cli import main
from repnet.continual.model import MultiTaskModel
from repnet.continual.metrics import continual_metrics
from repnet.continual.sequence import parse_tasks
from repnet.config.schema import TrainConfig
from repnet.config.build import build_data
from repnet.training.loop import evaluate, make_loader as _loader

SIZE = 32


def _train(mt, task, steps=3, classes=None):
    """A few Adam steps on random data for ``task`` only; returns the model in eval mode."""
    mt.set_task(task)
    mt.train()
    opt = torch.optim.Adam(mt.trainable_parameters(task), lr=1e-2)
    n = mt[task].num_classes
    for _ in range(steps):
        x = torch.randn(4, 3, SIZE, SIZE)
        loss = torch.nn.functional.cross_entropy(mt(x), torch.randint(0, n, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mt.eval()


def _clone(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A second set of mobilenet_v2 weights (random): same architecture, other fingerprint."""
    path = tmp_path_factory.mktemp("w") / "other.pth"
    torch.manual_seed(123)
    torch.save(create_backbone("mobilenet_v2", pretrained=False).model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("method_b", ["repnet", "da3", "tinytl_l", "last"])
@pytest.mark.parametrize("memory", ["engine", "vanilla"])
def test_training_task_b_leaves_task_a_and_backbone_bit_identical(method_b, memory):
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, memory=memory)
    mt.add_task("a", 3, "repnet")
    _train(mt, "a")
    x = torch.randn(5, 3, SIZE, SIZE)
    out_a = mt(x, task="a")
    state_a = _clone(mt.task_state_dict("a"))
    backbone = _clone(mt.backbone.state_dict())

    mt.add_task("b", 4, method_b)
    state_b0 = _clone(mt.task_state_dict("b"))
    _train(mt, "b", steps=4)
    assert torch.equal(mt(x, task="a"), out_a)
    assert _same(mt.task_state_dict("a"), state_a)
    assert _same(mt.backbone.state_dict(), backbone)
    assert not all(torch.equal(v, state_b0[k]) for k, v in mt.task_state_dict("b").items())  # b did train
    assert not any(p.requires_grad for p in mt.backbone.parameters())
    assert mt(x, task="b").shape == (5, 4)


@pytest.mark.parametrize("method,opts,why", [
    ("bias", {}, "trains 52 backbone tensors"),
    ("full", {}, "trains 156 backbone tensors"),
    ("tinytl_lb", {}, "trains 52 backbone tensors"),
    ("norm_last", {}, "backbone tensors"),
    ("repnet", {"train_bias": True}, "trains 52 backbone tensors"),
    ("repnet", {"bn": "batch"}, "bn=batch updates the backbone's norm statistics"),
])
def test_methods_that_change_the_backbone_are_refused_untouched(method, opts, why):
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE)
    mt.add_task("a", 3, "repnet")
    hooks = [len(b._forward_hooks) for b in mt.backbone.blocks()]
    with pytest.raises(RepnetError, match=f"method '{method}' cannot share a frozen backbone.*{why}"):
        mt.add_task("b", 3, method, **opts)
    assert mt.tasks == ["a"] and mt.active == "a"
    assert [len(b._forward_hooks) for b in mt.backbone.blocks()] == hooks  # nothing attached
    assert not any(p.requires_grad for p in mt.backbone.parameters())


def test_task_names_and_unknown_task():
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE)
    mt.add_task("a", 3, "last")
    with pytest.raises(RepnetError, match="duplicate task name 'a'"):
        mt.add_task("a", 3, "last")
    for bad in ("train", "x.y", "", "1st"):
        with pytest.raises(RepnetError, match="is not valid"):
            mt.add_task(bad, 3, "last")
    with pytest.raises(RepnetError, match="unknown task 'z'; tasks: a"):
        mt(torch.randn(1, 3, SIZE, SIZE), task="z")
    assert parse_tasks("digits,b=digits") == [("digits", "digits"), ("b", "digits")]
    with pytest.raises(RepnetError, match="duplicate task name 'digits'"):
        parse_tasks("digits,digits")


def test_naive_sequential_baseline_forgets():
    """The contrast: with backbone tensors trained in place, training task b changes task a."""
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, naive=True)
    mt.add_task("a", 3, "bias")
    _train(mt, "a")
    x = torch.randn(5, 3, SIZE, SIZE)
    out_a, head_a = mt(x, task="a"), _clone(mt.task_state_dict("a"))
    backbone = _clone(mt.backbone.state_dict())
    mt.add_task("b", 3, "bias")
    _train(mt, "b")
    assert _same(mt.task_state_dict("a"), head_a)  # a's own head is untouched ...
    assert not _same(mt.backbone.state_dict(), backbone)  # ... but the shared backbone moved
    assert not torch.allclose(mt(x, task="a"), out_a, atol=1e-4)


@pytest.mark.parametrize("naive", [False, True])
def test_save_load_round_trip_every_task(tmp_path, naive):
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, naive=naive)
    for name, method in (("a", "bias" if naive else "repnet"), ("b", "bias" if naive else "da3")):
        mt.add_task(name, 3, method)
        _train(mt, name)
    mt.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert [t["name"] for t in cfg["tasks"]] == ["a", "b"] and cfg["backbone"] == "mobilenet_v2"
    assert cfg["backbone_fingerprint"] == mt.backbone.fingerprint and cfg["naive"] == naive
    assert ("backbone_file" in cfg) == naive
    x = torch.randn(3, 3, SIZE, SIZE)
    m2 = MultiTaskModel.load(tmp_path / "m").eval()
    assert m2.tasks == ["a", "b"] and m2.active == "b"
    for t in ("a", "b"):
        assert torch.equal(m2(x, task=t), mt(x, task=t))
    # a later save replaces the files; the folder holds only what config.json names
    _train(mt, "a")
    mt.save(tmp_path / "m")
    files = {str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*.safetensors")}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert files == {t["file"] for t in cfg["tasks"]} | ({cfg["backbone_file"]} if naive else set())
    assert torch.equal(MultiTaskModel.load(tmp_path / "m").eval()(x, task="a"), mt(x, task="a"))


def test_load_refuses_another_backbone(tmp_path, backbone_file):
    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE)
    mt.add_task("a", 3, "repnet")
    mt.save(tmp_path / "m")
    with pytest.raises(RepnetError, match="backbone weights do not match the tasks in") as e:
        MultiTaskModel.load(tmp_path / "m", pretrained=backbone_file)
    assert "\n" not in str(e.value)
    with pytest.raises(RepnetError, match="trained on backbone 'mobilenet_v2', not 'proxylessnas_mobile'"):
        MultiTaskModel.load(tmp_path / "m", backbone=create_backbone("proxylessnas_mobile", pretrained=False))
    with pytest.raises(RepnetError, match="is not a saved multi-task model"):
        MultiTaskModel.load(tmp_path / "missing")


def test_continual_metrics():
    acc = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.85, 0.5]]
    m = continual_metrics(acc)
    assert m["average_accuracy"] == pytest.approx((0.6 + 0.85 + 0.5) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx([0.3, -0.05])  # best earlier accuracy - final (may be < 0)
    assert m["average_forgetting"] == pytest.approx(0.125)
    assert continual_metrics([[0.4]]) == {"average_accuracy": 0.4, "backward_transfer": None, "forgetting": [],
                                          "average_forgetting": None}


def test_cli_sequence_learns_forgets_nothing_and_json_matches_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["continual", "--tasks", "digits,fashion_mnist", "--backbone", "mobilenet_v2", "--method", "repnet",
            "--image-size", str(SIZE), "--epochs", "2", "--train-subset", "320", "--test-subset", "200",
            "--batch-size", "16", "--lr", "5e-3", "--lr-side", "5e-3", "--workers", "0", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    acc = r["acc"]
    assert r["tasks"] == ["digits", "fashion_mnist"] and r["complete"] and acc[0][1] is None
    # the frozen backbone: training fashion_mnist left digits' accuracy exactly where it was
    assert acc[1][0] == acc[0][0] and r["backward_transfer"] == 0.0 and r["forgetting"] == [0.0]
    assert r["average_accuracy"] == pytest.approx(sum(acc[1]) / 2)
    for rec in r["per_task"]:
        assert rec["trainable_params"] > 0 and rec["adapter_bytes"] >= 4 * rec["trainable_params"]
    st = r["storage"]
    assert st["total_bytes"] == st["backbone_bytes"] + sum(st["task_bytes"].values())
    assert st["separate_finetuned_bytes"] > 1.5 * st["backbone_bytes"]

    # the last row is what the saved model gives, recomputed from scratch
    mt = MultiTaskModel.load(out / "model").eval()
    untrained = MultiTaskModel(mt.backbone, SIZE)
    for j, name in enumerate(r["tasks"]):
        cfg = TrainConfig(**r["configs"][j])
        test = build_data(cfg, mt.backbone.mean, mt.backbone.std)[2]
        assert len(test) == 200
        got = evaluate(mt[name], _loader(test, cfg, torch.device("cpu")), torch.device("cpu"))["accuracy"]
        assert got == acc[1][j]
        if j == 0:  # accuracy rose well above what the untrained task gives (chance: 0.1)
            untrained.add_task(name, 10, "repnet")
            before = evaluate(untrained[name], _loader(test, cfg, torch.device("cpu")), torch.device("cpu"))
            assert got > 0.4 and got > before["accuracy"] + 0.25
    assert continual_metrics(acc) == {k: r[k] for k in ("average_accuracy", "backward_transfer", "forgetting",
                                                        "average_forgetting")}
    printed = capsys.readouterr().out  # --quiet: no progress, but the matrix is the result
    assert "after \\ on" in printed and "backward transfer +0.0000" in printed


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "digits,nope"], "error: unknown dataset 'nope'"),
    (["--tasks", "digits,digits"], "error: duplicate task name 'digits'"),
    (["--tasks", "digits", "--method", "bias"], "error: method 'bias' cannot share a frozen backbone"),
    (["--tasks", "digits", "--opt", "connector=x"], "error: option connector='x' is not valid"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, msg):
    assert main(["continual", *argv, "--image-size", str(SIZE), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(msg) and err.count("\n") == 1


def test_int8_continual_backbone_in_8_bits_tasks_in_int8_nothing_forgotten(tmp_path):
    """INT8 continual learning (docs/int8.md): the shared backbone is stored in 8 bits once,
    every task's side network trains as int8 MACs, and a new task leaves the others unchanged."""
    from repnet.memory.int8 import int8_layers
    from repnet.memory.quant import is_quantized

    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, int8={"rounding": "stochastic"})
    convs = [m for m in mt.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(is_quantized(m) for m in convs)  # frozen weights: 1 byte each
    codes = _clone({k: v for k, v in mt.backbone.state_dict().items() if k.endswith("weight_codes")})
    mt.add_task("a", 3, "repnet")
    assert len(int8_layers(mt["a"])) > 0 and mt["a"].int8_config["rounding"] == "stochastic"
    _train(mt, "a")
    x = torch.randn(4, 3, SIZE, SIZE)
    out_a = mt(x, task="a")
    mt.add_task("b", 5, "repnet")
    _train(mt, "b", steps=4)
    assert torch.equal(mt(x, task="a"), out_a)  # int8 forward is deterministic (round to nearest)
    assert _same({k: v for k, v in mt.backbone.state_dict().items() if k.endswith("weight_codes")}, codes)
    assert mt.storage()["backbone_bytes"] < 0.4 * sum(  # 8-bit codes instead of fp32 weights
        p.numel() * 4 for p in create_backbone("mobilenet_v2", pretrained=False).parameters())

    mt.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["int8"]["frozen"] == "linear"
    m2 = MultiTaskModel.load(tmp_path / "m").eval()
    assert all(len(int8_layers(m2[t])) > 0 for t in ("a", "b"))
    for t in ("a", "b"):
        assert torch.equal(m2(x, task=t), mt(x, task=t))
    with pytest.raises(RepnetError, match="does not combine with naive"):
        MultiTaskModel("mobilenet_v2", image_size=SIZE, naive=True, int8=True)


def test_interrupted_sequence_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    from repnet.continual.sequence import train_sequence

    kw = dict(backbone="mobilenet_v2", method="repnet", image_size=SIZE, epochs=1, train_subset=96, test_subset=64,
              batch_size=16, workers=0, progress=False, augment="basic")
    ref = train_sequence("digits,mnist5k", out_dir=tmp_path / "ref", **kw)

    calls = {"n": 0}
    real_save = MultiTaskModel.save

    def crashing_save(self, directory):
        calls["n"] += 1
        if calls["n"] == 2:  # killed while finishing the second task
            raise KeyboardInterrupt
        real_save(self, directory)

    monkeypatch.setattr(MultiTaskModel, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", **kw)
    monkeypatch.setattr(MultiTaskModel, "save", real_save)
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["complete"] is False

    with pytest.raises(RepnetError, match="already holds a continual run; continue it with --resume"):
        train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", **kw)
    with pytest.raises(RepnetError, match="settings changed"):
        train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", resume=True, **{**kw, "epochs": 2})
    with pytest.raises(RepnetError, match="not this sequence"):
        train_sequence("fashion_mnist,mnist5k", out_dir=tmp_path / "cut", resume=True, **kw)
    res = train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", resume=True, **kw)
    assert res["acc"] == ref["acc"] and res["complete"]
    a = MultiTaskModel.load(tmp_path / "ref" / "model")
    b = MultiTaskModel.load(tmp_path / "cut" / "model")
    for t in ("digits", "mnist5k"):
        assert _same(a.task_state_dict(t), b.task_state_dict(t))
    with pytest.raises(RepnetError, match="is complete: nothing to resume"):
        train_sequence("digits,mnist5k", out_dir=tmp_path / "cut", resume=True, **kw)


def test_int8_master_tasks_are_stored_as_int8_codes_exactly(tmp_path):
    from safetensors.torch import load_file

    from repnet.memory.int8 import attach_int8_master

    mt = MultiTaskModel("mobilenet_v2", image_size=SIZE, int8={"master": "int8"})
    mt.add_task("a", 3, "repnet")
    mt.set_task("a")
    mt.train()
    opt = torch.optim.Adam(mt.trainable_parameters("a"), lr=1e-2)
    attach_int8_master(mt["a"], opt)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(mt(torch.randn(4, 3, SIZE, SIZE)), torch.randint(0, 3, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    mt.eval()
    mt.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    stored = load_file(str(tmp_path / "m" / cfg["tasks"][0]["file"]))
    codes = [k for k in stored if k.endswith(".int8_codes")]
    assert codes and all(stored[k].dtype == torch.int8 for k in codes)
    fp32 = sum(v.numel() * v.element_size() for v in mt.task_state_dict("a").values())
    assert mt.storage()["task_bytes"]["a"] == sum(v.numel() * v.element_size() for v in stored.values()) < 0.5 * fp32
    x = torch.randn(3, 3, SIZE, SIZE)
    m2 = MultiTaskModel.load(tmp_path / "m").eval()
    assert _same(m2.task_state_dict("a"), mt.task_state_dict("a"))
    assert torch.equal(m2(x, task="a"), mt(x, task="a"))
