"""INT8 training of the side network (repnet.memory.int8, docs/int8.md)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn

import repnet
from repnet.errors import RepnetError
from repnet.memory.int8 import (QMAX, Int8Config, Int8Conv2d, Int8Linear, Int8StdConv2d, exact_acc_dtype,
                                disable_int8_training, enable_int8_training, int8_layers, quantize)
from repnet.memory import measure_saved, quantize_frozen_weights
from repnet.memory.analytic import analyze
from repnet.memory.ops.conv import standardize
from repnet.memory.quant import is_quantized


def _model(size=64, num_classes=5, **kw):
    return repnet.get_model("mobilenet_v2", "repnet", num_classes, image_size=size, pretrained=False, **kw)


def _layer(cls, base, *args, cfg=Int8Config(), **kw):
    m = base(*args, **kw)
    m.__class__ = cls
    m._int8 = cfg
    return m


# ----------------------------------------------------------------------------- the quantiser
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantiser_round_trip_error_bounds(rounding):
    t = torch.randn(4096) * 3
    q, s = quantize(t, rounding)
    assert torch.equal(s, t.abs().max() / QMAX)
    assert torch.equal(q, q.round()) and q.abs().max() <= QMAX and q.abs().max() == QMAX
    err = (q * s - t).abs().max()
    bound = s / 2 if rounding == "nearest" else s
    assert err <= bound * (1 + 1e-5)
    assert err > bound / 4  # it really is 8 bits, not the identity
    zq, zs = quantize(torch.zeros(7), rounding)
    assert torch.equal(zq, torch.zeros(7)) and zs == 1


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    s = 0.01
    vals = torch.tensor([QMAX * s, 0.3 * s, -0.3 * s, 2.71 * s, -40.45 * s])  # max |v| fixes the scale to s
    t = vals.repeat(20000, 1)
    q, scale = quantize(t, "stochastic")
    assert torch.allclose(scale, torch.tensor(s))
    mean = (q * scale).mean(0)
    # the per-draw error is at most one step; 5 standard errors of the mean
    assert torch.all((mean - vals).abs() < 5 * 0.5 * s / 20000 ** 0.5), (mean - vals) / s
    qn, _ = quantize(t, "nearest")
    assert (qn * scale).mean(0)[1] == 0  # 0.3 of a step always rounds to 0: nearest is biased


def test_accumulator_dtype_bound():
    # a sum of K products of codes is exact in float32 while K * 127^2 <= 2^24 (K <= 1040)
    assert exact_acc_dtype(torch.float32, 1040) == torch.float32
    assert exact_acc_dtype(torch.float32, 1041) == torch.float64
    assert exact_acc_dtype(torch.float64, 10) == torch.float64
    worst = torch.full((1041,), float(QMAX * QMAX))
    assert int(worst.double().sum()) == 1041 * QMAX * QMAX  # float64 holds the worst case exactly


# ----------------------------------------------------------------------------- exact integer references
def _i64(t):
    assert torch.equal(t, t.round())
    return t.to(torch.int64)


def _conv_forward_ref(x, w, stride, padding):
    """int64 accumulation of the int8 codes (groups = 1), then the scales."""
    xq, sx = quantize(x)
    wq, sw = quantize(w)
    n, _, h, wd = x.shape
    cols = _i64(F.unfold(xq.double(), w.shape[-2:], padding=padding, stride=stride))  # (n, c*k*k, L)
    acc = _i64(wq).reshape(w.shape[0], -1) @ cols  # (n, cout, L), int64
    ho = (h + 2 * padding - w.shape[2]) // stride + 1
    wo = (wd + 2 * padding - w.shape[3]) // stride + 1
    return acc.to(torch.float32).view(n, -1, ho, wo) * (sx * sw), (xq, sx, wq, sw, cols)


@pytest.mark.parametrize("cin,k,stride", [(4, 3, 1), (72, 5, 2)])  # K = 36 (float32 MAC), 1800 (float64)
def test_int8_conv_forward_and_backward_equal_integer_reference(cin, k, stride):
    torch.manual_seed(1)
    conv = _layer(Int8Conv2d, nn.Conv2d, cin, 6, k, stride=stride, padding=k // 2, bias=True)
    x = torch.randn(3, cin, 11, 11, requires_grad=True)
    y = conv(x)
    ref, (xq, sx, wq, sw, cols) = _conv_forward_ref(x.detach(), conv.weight.detach(), stride, k // 2)
    assert torch.equal(y.detach(), ref + conv.bias.detach().view(1, -1, 1, 1))

    g = torch.randn_like(y)
    torch.manual_seed(5)
    y.backward(g)
    torch.manual_seed(5)  # the layer's stochastic rounding of g draws exactly these numbers
    gq, sg = quantize(g, "stochastic")
    gq64 = _i64(gq).flatten(2)  # (n, cout, L)
    # weight gradient: sum over batch and pixels of x-codes * error-codes (int64)
    gw = torch.einsum("nol,nkl->ok", gq64, cols).to(torch.float32).view_as(conv.weight) * (sx * sg)
    assert torch.equal(conv.weight.grad, gw)
    # input gradient: error-codes times weight-codes (int64), scattered back (fold) exactly
    gcols = torch.einsum("ok,nol->nkl", _i64(wq).reshape(wq.shape[0], -1), gq64)
    gx = _i64(F.fold(gcols.double(), x.shape[-2:], k, padding=k // 2, stride=stride))
    assert torch.equal(x.grad, gx.to(torch.float32) * (sg * sw))
    assert torch.equal(conv.bias.grad, gq.sum((0, 2, 3)) * sg)


def test_int8_linear_forward_and_backward_equal_integer_reference():
    torch.manual_seed(2)
    lin = _layer(Int8Linear, nn.Linear, 1500, 7)  # K = 1500 > 1040: the float64 accumulator
    x = torch.randn(9, 1500, requires_grad=True)
    y = lin(x)
    xq, sx = quantize(x.detach())
    wq, sw = quantize(lin.weight.detach())
    ref = (_i64(xq) @ _i64(wq).t()).to(torch.float32) * (sx * sw) + lin.bias.detach()
    assert torch.equal(y.detach(), ref)
    g = torch.randn_like(y)
    torch.manual_seed(3)
    y.backward(g)
    torch.manual_seed(3)
    gq, sg = quantize(g, "stochastic")
    assert torch.equal(lin.weight.grad, (_i64(gq).t() @ _i64(xq)).to(torch.float32) * (sg * sx))
    assert torch.equal(x.grad, (_i64(gq) @ _i64(wq)).to(torch.float32) * (sg * sw))
    assert torch.equal(lin.bias.grad, gq.sum(0) * sg)


def test_weight_standardised_conv_quantises_the_standardised_weight():
    torch.manual_seed(4)
    conv = _layer(Int8StdConv2d, StdConv2d, 8, 8, 3, padding=1, bias=False, eps=1e-5)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    y = conv(x)
    ws = standardize(conv.weight.detach(), 1e-5)
    ref, (xq, sx, wq, sw, cols) = _conv_forward_ref(x.detach(), ws, 1, 1)
    assert torch.equal(y.detach(), ref)
    g = torch.randn_like(y)
    torch.manual_seed(6)
    y.backward(g)
    torch.manual_seed(6)
    gq, sg = quantize(g, "stochastic")
    gws = torch.einsum("nol,nkl->ok", _i64(gq).flatten(2), cols).to(torch.float32).view_as(ws) * (sx * sg)
    w = conv.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(standardize(w, 1e-5), w, gws)  # fp32 map back to the master weight
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_one_int8_layer_gradients_are_close_to_fp32(rounding):
    torch.manual_seed(3)
    conv = StdConv2d(16, 32, 3, padding=1, bias=False, eps=1e-5)
    q = copy.deepcopy(conv)
    q.__class__, q._int8 = Int8StdConv2d, Int8Config(rounding=rounding)
    x = torch.randn(8, 16, 12, 12)
    g = torch.randn(8, 32, 12, 12) * torch.rand(8, 1, 12, 12) ** 4  # errors of uneven size
    out = []
    for m in (conv, q):
        xi = x.clone().requires_grad_(True)
        m(xi).backward(g)
        out.append((m(x).detach(), xi.grad, m.weight.grad))
    for a, b in zip(*out):
        cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert 0.99 < cos < 1 - 1e-7, cos


def test_quantisation_off_equals_plain_fp32_gradients():
    torch.manual_seed(0)
    ref = _model()
    quantize_frozen_weights(ref, "linear")  # same 8-bit frozen backbone, float side network
    with torch.no_grad():  # open the zero-initialised gates so every path carries a gradient
        for m in ref.repnet:
            m.bn2.weight.fill_(0.5)
    off = copy.deepcopy(ref)
    enable_int8_training(off, weights=False, activations=False, errors=False)
    on = copy.deepcopy(ref)
    enable_int8_training(on)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    grads = []
    for m in (ref, off, on):
        m.train()
        torch.manual_seed(9)  # same dropout mask
        F.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys()
    assert len(int8_layers(on)) == 2 * len(on.repnet) + 1  # two convs per module + the head
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)
    # quantised: correlated with fp32 but not equal (this tiny random-init net at 64 px, with
    # side batch norms over a few pixels, amplifies the forward quantisation: see the layer test)
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in grads]
    cos = F.cosine_similarity(flat[0], flat[2], dim=0)
    assert 0.5 < cos < 1 - 1e-6, cos
    disable_int8_training(on)
    assert not int8_layers(on) and "int8" not in on.config()


# ----------------------------------------------------------------------------- the model
def test_only_side_network_head_and_biases_change_backbone_bit_identical():
    model = enable_int8_training(_model())
    keys = set(model.trainable_state_keys())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.param_groups(1e-2, 1e-2))
    model.train()
    for i in range(2):
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= keys, sorted(changed - keys)[:5]
    frozen = [k for k in before if k.startswith("backbone.") and k not in keys]
    assert any(k.endswith("weight_codes") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    int8_weights = {n + ".weight" for n, m in model.named_modules() if m in int8_layers(model)}
    assert int8_weights <= changed  # every INT8-trained weight moved


def _digits(size=32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=size, mode="nearest").expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.25, torch.tensor(d.target)


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_int8_training_learns_digits():
    """Offline ImageNet MobileNetV2 + INT8 Rep-Net on sklearn digits at 32 px: 50 steps learn.

    (A random-init backbone gives features too poor to learn from in a few steps at 32 px.)
    """
    x, y = _digits()
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    torch.manual_seed(0)
    model = enable_int8_training(repnet.get_model("mobilenet_v2", "repnet", 10, image_size=32, pretrained=True))
    before = _accuracy(model, xte, yte)
    opt = torch.optim.Adam(model.param_groups(3e-3, 3e-3))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    after = _accuracy(model, xte, yte)
    assert before < 0.2 and after > 0.6, (before, after)


def test_train_with_int8_config_end_to_end(tmp_path):
    from repnet.training.run import TrainConfig, train

    cfg = TrainConfig(dataset="digits", backbone="mobilenet_v2", random_init=True, int8=True, image_size=32,
                      epochs=1, steps_per_epoch=2, batch_size=8, lr=1e-3, lr_side=1e-3, label_smoothing=0.1,
                      train_subset=64, test_subset=32, workers=0, progress=False, out_dir=str(tmp_path / "run"))
    seen = []
    res = train(cfg, on_step=lambda info: seen.append(len(int8_layers(info["model"]))))
    assert seen and all(n > 0 for n in seen) and res["steps"] == 2
    assert res["measured_saved_mb"] is not None and res["config"]["int8"] is True
    saved = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())
    assert saved["int8"]["rounding"] == "stochastic"


# ----------------------------------------------------------------------------- memory
def test_frozen_weights_one_byte_each_and_int8_kept_for_backward():
    fp32 = _model()
    frozen_numel = sum(m.weight.numel() for m in fp32.backbone.modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear)))
    model = enable_int8_training(copy.deepcopy(fp32))
    convs = [m for m in model.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(is_quantized(m) for m in convs)
    assert not any(isinstance(m._parameters.get("weight"), nn.Parameter) for m in convs)
    code_bytes = sum(m.weight_codes.numel() * m.weight_codes.element_size() for m in convs)
    assert code_bytes == frozen_numel  # measured: 1 byte per frozen weight
    rep = analyze(model, 64)  # analytic: 4 B per trainable, 1 B per frozen parameter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + frozen_numel
    assert rep.param_bytes == 4 * trainable + frozen
    # the INT8 layers keep their input as int8 codes: less kept for backward than fp32
    x = torch.randn(4, 3, 64, 64)
    quantize_frozen_weights(fp32, "linear")
    saved32, saved8 = measure_saved(fp32, x), measure_saved(model, x)
    assert saved8.by_dtype.get("torch.int8", 0) > 0 and "torch.int8" not in saved32.by_dtype
    assert saved8.bytes < saved32.bytes


# ----------------------------------------------------------------------------- surfaces
def test_save_load_round_trip_reapplies_int8(tmp_path):
    torch.manual_seed(7)  # a randomly initialised backbone is rebuilt identically by from_pretrained
    model = enable_int8_training(_model(), rounding="nearest", frozen="kmeans")
    with torch.no_grad():
        for m in model.repnet:
            m.bn2.weight.fill_(0.5)
    model.eval().save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["int8"]["rounding"] == "nearest" and cfg["int8"]["frozen"] == "kmeans"
    torch.manual_seed(7)
    loaded = repnet.from_pretrained(tmp_path / "a").eval()
    assert len(int8_layers(loaded)) == len(int8_layers(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_config_cli_and_bad_input():
    from repnet.commands.flags import overrides_from as args_to_overrides
    from repnet.commands.train import configure as configure_train_parser
    from repnet.config.recipes import make_config
    import argparse

    p = argparse.ArgumentParser()
    configure_train_parser(p)
    cfg = make_config(args_to_overrides(p.parse_args(["--int8", "--set", "int8_rounding=nearest"])))
    assert cfg.int8 is True and cfg.int8_rounding == "nearest"
    assert make_config({}).int8 is False
    with pytest.raises(RepnetError, match="int8_rounding='up' is not valid"):
        make_config({"int8_rounding": "up"})
    with pytest.raises(RepnetError, match="rounding='up' is not valid"):
        enable_int8_training(_model(), rounding="up")
    with pytest.raises(RepnetError, match="needs a frozen backbone"):
        enable_int8_training(repnet.get_model("mobilenet_v2", "full", 5, image_size=64, pretrained=False))
    with pytest.raises(RepnetError, match="already enabled"):
        enable_int8_training(enable_int8_training(_model()))


def test_int8_run_resumes_bit_identically(tmp_path):
    """The stochastic rounding of the errors draws from the global generator, whose state the
    checkpoint carries: a run killed mid-epoch and resumed equals the uninterrupted one."""
    from repnet.training.run import make_config, train

    class Killed(Exception):
        pass

    def cfg(name):
        return make_config(dict(dataset="digits", backbone="proxylessnas_mobile", random_init=True, method="repnet",
                                image_size=32, batch_size=8, epochs=2, steps_per_epoch=3, workers=0, progress=False,
                                profile_memory=False, int8=True, checkpoint_every=2, out_dir=str(tmp_path / name)))

    ref = train(cfg("ref"))

    def kill(info):
        if info["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(cfg("cut"), on_step=kill)
    res = train(cfg("cut"), resume=str(tmp_path / "cut"))
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res["final_test_accuracy"] == ref["final_test_accuracy"]
    # the equality above is not trivial: another seed ends with other weights
    other = train(make_config({**cfg("other").to_dict(), "seed": 1, "out_dir": str(tmp_path / "other")}))
    c = torch.load(tmp_path / "other" / "checkpoint.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert other["steps"] == ref["steps"]


def _on_grid(w: torch.Tensor) -> bool:
    s = w.abs().amax() / QMAX
    codes = w / s
    return bool(torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= QMAX + 1e-3)


def test_int8_master_keeps_weights_on_the_int8_grid_and_still_learns():
    """master="int8": after every optimizer step each INT8-trained weight is codes * scale."""
    from repnet.memory.int8 import attach_int8_master, project_int8_weights

    x, y = _digits()
    xtr, ytr, xte, yte = x[:1200], y[:1200], x[1200:], y[1200:]
    torch.manual_seed(0)
    model = enable_int8_training(repnet.get_model("mobilenet_v2", "repnet", 10, image_size=32, pretrained=True),
                                 master="int8")
    layers = int8_layers(model)
    assert layers and all(_on_grid(m.weight) for m in layers)  # projected at enable time
    opt = torch.optim.Adam(model.param_groups(3e-3, 3e-3))
    assert attach_int8_master(model, opt) is not None
    g = torch.Generator().manual_seed(0)
    before = _accuracy(model, xte, yte)
    for _ in range(50):
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        assert all(_on_grid(m.weight) for m in layers)
    after = _accuracy(model, xte, yte)
    assert before < 0.2 and after > 0.6, (before, after)
    assert attach_int8_master(enable_int8_training(_model()), opt) is None  # fp32 master: no hook
    # stochastic projection is unbiased: the mean over many draws is the weight itself
    w = torch.randn(64, 32) * 0.01
    lin = nn.Linear(32, 64)
    lin.__class__, lin._int8 = Int8Linear, Int8Config()
    holder = nn.Sequential(lin)
    draws = []
    for _ in range(400):
        lin.weight.data.copy_(w)
        project_int8_weights(holder, "stochastic")
        draws.append(lin.weight.detach().clone())
    step = w.abs().max() / QMAX
    assert (torch.stack(draws).mean(0) - w).abs().max() < 0.2 * step
    with pytest.raises(RepnetError, match="master"):
        enable_int8_training(_model(), master="int4")


def test_analytic_model_counts_int8_inputs_and_int8_master_weights():
    size = 64
    fp = _model(size)
    a_fp = analyze(fp, size)
    q = enable_int8_training(_model(size))
    a_q = analyze(q, size)
    # each INT8 layer keeps 1 byte per input element instead of 4: the kept total drops by 3/4 of those inputs
    names = {n for n, m in q.named_modules() if m in int8_layers(q)}
    int8_inputs = sum(r.in_numel for r in a_q.rows if r.name in names)
    assert int8_inputs > 0
    assert a_fp.kept_bytes - a_q.kept_bytes == pytest.approx(3 * int8_inputs)
    measured = measure_saved(q, torch.randn(2, 3, size, size)).bytes
    assert measured <= 1.15 * 2 * a_q.kept_bytes  # what the engine keeps, the rules now say
    m8 = enable_int8_training(_model(size), master="int8")
    on_grid = sum(m.weight.numel() for m in int8_layers(m8))
    assert analyze(m8, size).param_bytes == pytest.approx(a_q.param_bytes - 3 * on_grid)


def test_int8_master_adapter_is_saved_as_exact_int8_codes(tmp_path):
    from safetensors.torch import load_file

    from repnet.memory.int8 import attach_int8_master

    m = enable_int8_training(repnet.get_model("mobilenet_v2", "repnet", 5, image_size=32, pretrained=True),
                             master="int8")  # offline weights: from_pretrained rebuilds the same backbone
    opt = torch.optim.Adam(m.param_groups(1e-2, 1e-2))
    attach_int8_master(m, opt)
    m.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.randint(0, 5, (4,))).backward()
        opt.step()
    m.eval()
    m.save_pretrained(str(tmp_path / "a"))
    stored = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    codes = [k for k in stored if k.endswith(".int8_codes")]
    assert len(codes) == len(int8_layers(m)) and all(stored[k].dtype == torch.int8 for k in codes)
    m2 = repnet.from_pretrained(str(tmp_path / "a")).eval()
    sd, sd2 = m.trainable_state_dict(), m2.trainable_state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m2(x))


def test_parameter_totals_count_8_bit_frozen_weights():
    import repnet

    fp = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False)
    q = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, int8=True)
    assert q.param_counts() == fp.param_counts()  # the frozen weights are still there, as 8-bit codes
