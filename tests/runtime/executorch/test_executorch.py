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

from repnet.runtime.executorch.passes import PASSES
from repnet.runtime.executorch.planning import offsets_by_size  # noqa: E402
from repnet.runtime.executorch.trainer import RuntimeTrainer
from repnet.runtime.executorch.program import TrainStep, export_training_program, program_build  # noqa: E402,E501


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


def _grads_match(model, prog, batch=2, size=16, classes=4, portable=None):
    """Loss, logits and every trained gradient of one forward_backward of ``prog`` equal eager PyTorch's (and,
    given, the ``portable`` program's: 1e-5 of each tensor's largest magnitude)."""
    if prog.kernels:  # repnet's kernels (repnet.runtime.executorch.kernels): their library in this process
        from repnet.runtime.executorch.kernels import load_kernels

        load_kernels()
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
    if portable is not None:
        p_mod = _load_for_executorch_for_training_from_buffer(portable.buffer)
        p_loss, p_logits = p_mod.forward_backward("forward", (x, y))
        p_grads = p_mod.named_gradients()
        for got, ref, what in ((loss, p_loss, "loss"), (logits, p_logits, "logits"),
                               *((grads[f"model.{n}"], p_grads[f"model.{n}"], n) for n in trained)):
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-7, f"{what} vs portable"


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


def _without(name):
    return tuple(p for p in PASSES if p != name)


def test_pack_masks_keeps_one_bit_per_element_for_the_backward():
    """With pack_masks, what the forward leaves for a ReLU6's backward is uint8 codes (numel / 8), not bool
    masks: the plan shrinks by 7/8 of the masks, gradients unchanged."""
    torch.manual_seed(0)
    model = Tiny().eval()
    ours = export_training_program(model, 4, 16)
    unpacked = export_training_program(model, 4, 16, passes=_without("pack_masks"))
    assert ours.rewrites["pack_masks"] == 1 and "pack_masks" not in unpacked.rewrites
    _grads_match(model, ours, batch=4)
    # the second ReLU6's mask: 4 x 8 x 16 x 16 bool -> 1/8 of it as uint8 codes
    assert unpacked.planned_bytes - ours.planned_bytes >= 4 * 8 * 16 * 16 * 7 // 8 - 64


class Chain(nn.Module):
    """trainable conv -> frozen conv -> BN -> ReLU6 -> frozen depthwise conv -> BN -> ReLU6 -> head: the
    forward's peak is a conv output and the BN output written beside it."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 8, 3, padding=1)
        self.frozen = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                                    nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                    nn.ReLU6())
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.frozen(self.side(x)).mean((2, 3)))


def test_inplace_planning_writes_elementwise_outputs_over_dead_inputs():
    torch.manual_seed(0)
    model = Chain().eval()
    ours = export_training_program(model, 4, 16)
    fresh = export_training_program(model, 4, 16, passes=_without("inplace"))
    assert ours.rewrites["inplace"] > 5 and "inplace" not in fresh.rewrites
    _grads_match(model, ours, batch=4)
    assert ours.planned_bytes < fresh.planned_bytes  # (224 px figures: benchmarks/executorch_memory.py)
    with pytest.raises(RepnetError, match="unknown ExecuTorch pass"):
        export_training_program(model, 4, 16, passes=("frozen_conv", "fuse_everything"))


class Wide(nn.Module):
    """trainable conv -> two frozen 1x1 convs 64 -> 64 (weights 16 KB each in float) at 4 x 4 -> head."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(3, 64, 3, padding=1)
        self.frozen = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU())
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.frozen(self.side(x)).mean((2, 3)))


def test_recompute_weights_keeps_no_dequantised_weight_across_the_step():
    """8-bit frozen weights (plain-PyTorch layers, dequantised in the graph): gradients equal eager PyTorch's on
    the same dequantised weights, the program holds int8 codes, and without recompute_weights both float copies
    would live from the forward to the backward."""
    from repnet.memory.quant import PlainQuantConv2d, quantize_frozen_weights

    torch.manual_seed(0)
    model = Wide().eval()
    fp32 = export_training_program(model, 2, 4)
    quantize_frozen_weights(model, "linear", engine=False)
    assert all(isinstance(m, PlainQuantConv2d) for m in model.frozen[::2])
    ours = export_training_program(model, 2, 4, kernels=False)  # the portable program dequantises in the graph
    kept = export_training_program(model, 2, 4, passes=_without("recompute_weights"), kernels=False)
    assert ours.rewrites["recompute_weights"] >= 2
    _grads_match(model, ours, size=4)
    # 4 -> 1 byte per frozen weight, + a float scale per output channel
    assert fp32.weights_bytes - ours.weights_bytes == 2 * 64 * 64 * 3 - 2 * 64 * 4
    assert kept.planned_bytes - ours.planned_bytes >= 0.9 * 64 * 64 * 4  # one float copy fewer at the peak
    # repnet's kernels read the codes: no float copy of a frozen weight is planned at all
    kern = export_training_program(model, 2, 4)
    _grads_match(model, kern, size=4, portable=ours)
    assert ours.planned_bytes - kern.planned_bytes >= 0.9 * 64 * 64 * 4


class LatePool(nn.Module):
    """frozen convs on the image, then a trainable conv on the image pooled by 4 (as Rep-Net's module 1
    reads it), joined at the end."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                    nn.ReLU())
        self.frozen.requires_grad_(False)
        self.side = nn.Conv2d(3, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = nn.functional.avg_pool2d(self.frozen(x), 4) + self.side(nn.functional.avg_pool2d(x, 4))
        return self.head(h.mean((2, 3)))


def test_hoist_input_reductions_lets_the_image_go_before_the_frozen_convs():
    torch.manual_seed(0)
    model = LatePool().eval()
    ours = export_training_program(model, 2, 32)
    held = export_training_program(model, 2, 32, passes=_without("hoist_input_reductions"))
    assert ours.rewrites["hoist_input_reductions"] == 1  # the image's pool; the frozen output's pool is not
    _grads_match(model, ours, size=32)
    # the image (2 x 3 x 32 x 32 floats) no longer lives through the frozen convs; its pool (1/16) does
    assert held.planned_bytes - ours.planned_bytes >= 2 * 3 * 32 * 32 * 4 * 15 // 16 - 64


def test_offsets_by_size_packs_tensors_without_overlap():
    """Largest first at the lowest free offset: hand-checked layout of five tensors."""
    from executorch.exir.tensor import TensorSpec

    def spec(nbytes, t0, t1):
        s = TensorSpec.from_tensor(torch.empty(nbytes, dtype=torch.uint8))
        s.init_mem_planning_fields()
        s.lifetime = [t0, t1]
        return s

    # c's lifetime already covers the tensor written in its storage (ExecuTorch extends it so)
    a, b, c, d, e = spec(64, 0, 2), spec(32, 1, 3), spec(32, 3, 6), spec(16, 2, 4), spec(64, 4, 6)
    child = spec(32, 5, 6)
    child.storage_base = c
    res = offsets_by_size(16, {a, b, c, d, e, child}, None, None)
    off = {n: res.spec_dict[s].mem_offset for n, s in zip("abcde", (a, b, c, d, e))}
    # a at 0; e (after a's last use) at 0 again; b beside a; c beside b (e and b alive); d, alive with
    # all four, above them
    assert off == {"a": 0, "e": 0, "b": 64, "c": 96, "d": 128}
    assert res.spec_dict[child].mem_offset == off["c"] and res.bufsizes[1] == 144
    placed = [(off[n], off[n] + s.allocated_memory, *s.lifetime) for n, s in zip("abcde", (a, b, c, d, e))]
    for i, (lo, hi, s0, s1) in enumerate(placed):
        for lo2, hi2, u0, u1 in placed[i + 1:]:
            assert s1 < u0 or u1 < s0 or hi <= lo2 or hi2 <= lo  # overlapping in time -> apart in memory


def test_avg_pool_backward_is_rewritten_and_refused_without_the_rewrite():
    torch.manual_seed(0)
    model = Tiny(pool=nn.AvgPool2d(2)).eval()
    with pytest.raises(RepnetError, match="avg_pool2d_backward.*no runtime kernel"):
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
    assert "\n" not in str(e.value) and "norm=group" in str(e.value)
    bias = repnet.get_model("proxylessnas_mobile", "bias", 4, image_size=32, pretrained=False, memory="vanilla",
                            bn="batch")
    with pytest.raises(RepnetError, match="bn=batch"):
        export_training_program(bias.eval(), 2, 32)


@pytest.mark.parametrize("backbone", ["proxylessnas_mobile", "mobilenet_v2"])
@pytest.mark.parametrize("method", ["repnet", "bias", "last"])
def test_forward_backward_equals_eager_for_real_backbones(backbone, method):
    """Every method as --runtime executorch builds it (Rep-Net: GroupNorm modules; frozen weights in 8 bits), every
    pass on: the program on repnet's kernels equals eager PyTorch and the portable program (kernels=False), which
    equals eager PyTorch too."""
    torch.manual_seed(0)
    model = repnet.get_model(backbone, method, 4, image_size=32, pretrained=False, **program_build(method)).eval()
    with torch.no_grad():  # a head that is not zero: every gradient is non-trivial
        model.head[-1].weight.normal_(0, 0.1)
        for m in model.modules():  # Rep-Net's last norms start at gamma = 0: open them
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1, 0.1)
    prog = export_training_program(model, 2, 32)
    if method != "last":
        assert prog.rewrites["frozen_conv"] > 10 and prog.rewrites["activation_mask"] > 10
        assert prog.rewrites["pack_masks"] > 5 and prog.rewrites["inplace"] > 20
    if method == "repnet":
        assert prog.rewrites["avg_pool"] > 0 and prog.rewrites["kernel_resize"] > 0
    assert prog.kernels and prog.rewrites["kernel_conv"] > 50
    portable = export_training_program(model, 2, 32, kernels=False)
    assert not portable.kernels
    _grads_match(model, portable, size=32)
    _grads_match(model, prog, size=32, portable=portable)


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
    """The issue's command as it stands (Rep-Net, the recipes, runtime-executorch.yaml's SGD rates)."""
    assert main(["--threads", "2", "train", "--runtime", "executorch", "--dataset", "digits", "--image-size", "32",
                 "--epochs", "2", "--workers", "0", "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["runtime"] == "executorch" and res["method"] == "repnet" and res["program_kernels"] == "repnet"
    assert res["test_accuracy"] >= 0.80, res["test_accuracy"]
    assert res["program_planned_mb"] > 0 and res["program_rewrites"]["pack_masks"] > 0
    model = repnet.from_pretrained(str(out / "adapter"), memory="vanilla").eval()
    assert model.options.norm == "group" and model.frozen_bits == "linear"  # as the program trained it
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
    assert "kernel_conv" in out and "runs repnet's kernels" in out  # on by default
    assert main(["export", "--training", "--backbone", "mobilenet_v2", "--method", "last", "--image-size", "32",
                 "--batch-size", "2", "--portable", "--out", str(tmp_path / "last.pte")]) == 0
    out = capsys.readouterr().out
    assert "kernel_conv" not in out and "repnet's kernels" not in out
    assert main(["export", "--training", "--backbone", "mobilenet_v2", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "is a .pte file" in capsys.readouterr().err


def test_profile_reports_the_program_column(tmp_path, capsys):
    f = tmp_path / "p.json"
    assert main(["profile", "--backbone", "mobilenet_v2", "--method", "bias", "--image-size", "32", "--batch-size",
                 "2", "--num-classes", "4", "--no-peak", "--runtime", "executorch", "--json", str(f)]) == 0
    assert "ExecuTorch planned MB" in capsys.readouterr().out
    rec = json.loads(f.read_text())
    assert rec["analytic_planned_mb"] == pytest.approx(rec["analytic_peak_activation_mb"]
                                                       + 4 * rec["trainable_params"] / 1e6)
    # (the portable program would plan the float copy of the largest frozen weight, dequantised while its layer
    # runs - 320 x 1280 for MobileNetV2: 1.64 MB, more than the activations at 32 px; repnet's kernels read the
    # int8 codes: the 224 px table: benchmarks/executorch_memory.py)
    assert 0 < rec["program_planned_mb"] < 1.64 and rec["program_planned_mb"] <= rec["program_arena_mb"]
    assert rec["program_rewrites"]["frozen_conv"] > 10
