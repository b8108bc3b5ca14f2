"""ExecuTorch training programs: each graph pass does what it says (and the planner then keeps
less), loss and every trained gradient of one forward_backward equal eager PyTorch's, the
runtime's SGD equals torch's, unsupported patterns fail in one line, and `repnet train --runtime
executorch` learns and leaves an adapter that eager PyTorch reloads."""
import json

import pytest
import torch
from torch import nn

import repnet
from repnet import RepnetError
from repnet.cli import main

pytest.importorskip("executorch")

from executorch.extension.training import _load_for_executorch_for_training_from_buffer  # noqa: E402

from repnet.executorch_training import RuntimeTrainer, TrainStep, export_training_program  # noqa: E402


class Tiny(nn.Module):
    """frozen conv + BN + ReLU6, + a trainable branch, frozen depthwise conv + BN + ReLU6 -> (pool) ->
    trainable conv -> head: the patterns the passes meet."""

    def __init__(self, pool=None):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.frozen.requires_grad_(False)
        self.side = nn.Conv2d(3, 8, 3, padding=1)  # trainable, joins before the last frozen layers
        self.pool = pool or nn.Identity()
        self.train_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        for m in self.frozen:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.frozen[:3](x) + self.side(x)
        h = self.frozen[3:](h)
        h = self.train_conv(self.pool(h))
        return self.head(h.mean((2, 3)))


def _grads_match(model, prog, batch=2, size=16, classes=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    mod = _load_for_executorch_for_training_from_buffer(prog.buffer)
    loss, logits = mod.forward_backward("forward", (x, y))
    grads = mod.named_gradients()
    model.zero_grad()
    ref_loss, ref_logits = TrainStep(model).eval()(x, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(prog.trainable) == sorted(trained)
    for n in trained:
        ref = model.get_parameter(n).grad
        got = grads[f"model.{n}"]
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-7, n


def test_passes_keep_gradients_and_free_what_the_backward_does_not_need():
    torch.manual_seed(0)
    model = Tiny().eval()
    stock = export_training_program(model, 2, 16, rewrite=False)
    ours = export_training_program(model, 2, 16)
    assert ours.rewrites["frozen_conv"] == 1  # the depthwise conv after the join (the first one needs no backward)
    assert ours.rewrites["activation_mask"] == 2  # the second ReLU6's le / ge (the first one needs no backward)
    _grads_match(model, stock)
    _grads_match(model, ours)
    assert ours.planned_bytes < stock.planned_bytes


def test_avg_pool_backward_is_rewritten_and_refused_without_the_rewrite():
    torch.manual_seed(0)
    model = Tiny(pool=nn.AvgPool2d(2)).eval()
    with pytest.raises(RepnetError, match="avg_pool2d_backward has no runtime kernel"):
        export_training_program(model, 2, 16, rewrite=False)
    prog = export_training_program(model, 2, 16)
    assert prog.rewrites["avg_pool"] == 1
    _grads_match(model, prog)


def test_unsupported_patterns_fail_in_one_line():
    torch.manual_seed(0)
    with pytest.raises(RepnetError, match="max_pool2d_with_indices_backward") as e:
        export_training_program(Tiny(pool=nn.MaxPool2d(2)).eval(), 2, 16)
    assert "\n" not in str(e.value)
    rep = repnet.get_model("proxylessnas_mobile", "repnet", 4, image_size=32, pretrained=False, memory="vanilla")
    with pytest.raises(RepnetError, match="batch statistics") as e:
        export_training_program(rep.eval(), 2, 32)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backbone", ["proxylessnas_mobile", "mobilenet_v2"])
@pytest.mark.parametrize("method", ["bias", "last"])
def test_forward_backward_equals_eager_for_real_backbones(backbone, method):
    torch.manual_seed(0)
    model = repnet.get_model(backbone, method, 4, image_size=32, pretrained=False, memory="vanilla").eval()
    with torch.no_grad():  # a head that is not zero: every gradient is non-trivial
        model.head.weight.normal_(0, 0.1) if hasattr(model.head, "weight") else None
    prog = export_training_program(model, 2, 32)
    if method == "bias":
        assert prog.rewrites["frozen_conv"] > 10 and prog.rewrites["activation_mask"] > 10
    _grads_match(model, prog, size=32)


def test_rep_net_program_gradients_with_fixed_statistics():
    """Rep-Net's program (its modules' norms at fixed statistics; refused for training): avg-pool rewrite
    on a real model, gradients equal to the same eval-mode model in eager PyTorch."""
    torch.manual_seed(0)
    model = repnet.get_model("mobilenet_v2", "repnet", 4, image_size=32, pretrained=False, memory="vanilla").eval()
    prog = export_training_program(model, 2, 32, allow_batch_stats=True)
    assert prog.rewrites["avg_pool"] > 0
    _grads_match(model, prog, size=32)


def test_runtime_sgd_equals_torch_sgd():
    torch.manual_seed(0)
    model = Tiny().eval()
    ref = Tiny().eval()
    ref.load_state_dict(model.state_dict())
    trainer = RuntimeTrainer(model, export_training_program(model, 2, 16), lr=0.05, lr_side=0.05, momentum=0.9)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    for _ in range(3):
        loss, _ = trainer.step(x, y)
        opt.zero_grad()
        ref_loss, _ = TrainStep(ref).eval()(x, y)
        ref_loss.backward()
        opt.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)  # the trained tensors came back to eager
    with pytest.raises(RepnetError, match="batches of 2"):
        trainer.step(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]))


def test_train_on_the_runtime_learns_digits_and_the_adapter_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--threads", "2", "train", "--runtime", "executorch", "--dataset", "digits", "--image-size", "32",
                 "--epochs", "2", "--method", "last", "--lr", "0.05", "--label-smoothing", "0", "--augment", "none",
                 "--workers", "0", "--quiet",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["runtime"] == "executorch" and res["test_accuracy"] >= 0.80, res["test_accuracy"]
    assert res["program_planned_mb"] > 0
    model = repnet.from_pretrained(str(out / "adapter"), memory="vanilla").eval()
    prog = export_training_program(model, 8, 32)  # the trained tensors, back in a program
    mod = _load_for_executorch_for_training_from_buffer(prog.buffer)
    x, y = torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    _, logits = mod.forward_backward("forward", (x, y))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    assert main(["train", "--runtime", "executorch", "--dataset", "digits", "--resume", str(out), "--quiet"]) == 2
    assert "not supported with --runtime executorch" in capsys.readouterr().err


def test_cli_export_training_program(tmp_path, capsys):
    pte = tmp_path / "bias.pte"
    assert main(["export", "--training", "--backbone", "mobilenet_v2", "--method", "bias", "--image-size", "32",
                 "--batch-size", "2", "--out", str(pte)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "planned memory" in out and "frozen_conv" in out and pte.stat().st_size > 0
    assert main(["export", "--training", "--backbone", "mobilenet_v2", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "is a .pte file" in capsys.readouterr().err
