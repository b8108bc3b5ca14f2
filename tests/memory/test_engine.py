"""The memory engine: gradients identical to PyTorch, and what it keeps is exactly what it claims."""
import copy
import pickle

import pytest
import torch
from torch import nn

import repnet
from repnet.memory import (apply_engine, engine_applied, measure_peak_bytes, measure_saved, measure_saved_bytes,
                           profile, quantize_frozen_weights, remove_engine, set_step_backward)
from repnet.memory import engine as E
from repnet.memory.quant import is_quantized, kmeans_codebook, quantized_weight_numel

# float64: the NHWC kernels and the in-place affine sum in other orders than the NCHW ones (a real
# error is of the order of the gradient itself)
F64 = dict(rtol=1e-7, atol=1e-9)


class Frozen(nn.Module):
    """Wraps a net so that ``train()`` keeps norms in eval mode (frozen statistics)."""

    def __init__(self, net: nn.Module, bn_train: bool = False):
        super().__init__()
        self.net, self.bn_train = net, bn_train

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d) and not self.bn_train:
                m.eval()
        return self

    def forward(self, x):
        return self.net(x)


def _randomize_norms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _freeze(net, trainable=lambda name, p: False):
    for n, p in net.named_parameters():
        p.requires_grad_(trainable(n, p))
    return net


def _assert_same_training(ref: nn.Module, eng: nn.Module, x: torch.Tensor, x_grad: bool = False, seed: int = 3,
                          tol: dict = F64):
    """Forward + backward both; outputs, trainable grads, input grad and buffers must agree."""
    outs, xgrads = [], []
    for m in (ref, eng):
        xi = x.clone().requires_grad_(x_grad)
        torch.manual_seed(seed)  # same dropout masks
        out = m(xi)
        (out.square().sum() + out.sum()).backward()
        outs.append(out)
        xgrads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    n_checked = 0
    rp, ep = dict(ref.named_parameters()), dict(eng.named_parameters())
    trained = {n for n, p in rp.items() if p.requires_grad}
    assert trained == {n for n, q in ep.items() if q.requires_grad}
    for n in sorted(trained):
        assert ep[n].grad is not None, n
        _close(ep[n].grad, rp[n].grad, tol, n)
        n_checked += 1
    if x_grad:
        torch.testing.assert_close(xgrads[1], xgrads[0], **tol)
    rb, eb = dict(ref.named_buffers()), dict(eng.named_buffers())
    assert set(rb) <= set(eb)  # the engine may hold more (8-bit weight codes and scales)
    for n, b in rb.items():
        _close(eb[n], b, tol, f"buffer {n}")
    return n_checked


def _close(a: torch.Tensor, b: torch.Tensor, tol: dict, name: str) -> None:
    """``a`` equals ``b`` to ``tol``, an element's absolute error measured against its tensor's scale:
    sums of large terms of both signs round by that scale. Plain PyTorch itself, NCHW against NHWC,
    differs by 2.3e-7 of the scale on TinyTL-L+B / MobileNetV2 here (float64, randomised norms); a
    wrong gradient is off by the scale itself."""
    atol = max(tol["atol"], 10 * tol["rtol"] * float(b.abs().max())) if b.is_floating_point() and b.numel() else 0
    torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=atol if b.is_floating_point() else 0,
                               msg=lambda s: f"{name}: {s}")


# ----------------------------------------------------------------------------- bit masks
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001, 840])
def test_pack_bits_roundtrip_and_size(n):
    m = torch.rand(n) > 0.5
    p = E.pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(E.unpack_bits(p, m.shape), m)


def test_pack_bits_layout_and_views():
    assert E.pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)).tolist() == [129]
    assert E.pack_bits(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]
    m = (torch.rand(4, 5, 6, 7) > 0.3)[:, 1:]  # non-contiguous
    assert torch.equal(E.unpack_bits(E.pack_bits(m), m.shape), m)


# ----------------------------------------------------------------------------- gradient matrix
def _chain():
    """Frozen convs of every flavour (strided, depthwise, grouped + dilated, 1x1), BN, ReLU/ReLU6."""
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),  # trainable in some cases: the rest then needs input gradients
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 12, 3, padding=2, dilation=2, groups=4), nn.Hardtanh(0.0, 6.0),
        nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24, bias=False), nn.BatchNorm2d(24),
        nn.Hardswish(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24 * 2 * 2, 10), nn.Linear(10, 5),
    ]
    net = nn.Sequential(*layers).double()
    _randomize_norms(net)
    return net


CASES = {
    # name: (trainable rule, needs input grad)
    "trainable_input_layer": (lambda n, p: n.startswith("0."), False),
    "bias_only": (lambda n, p: n.endswith("bias"), False),
    "last_only": (lambda n, p: n.startswith("18."), False),
    "bias_only_input_grad": (lambda n, p: n.endswith("bias"), True),
    "nothing_but_input": (lambda n, p: False, True),
    "head_and_first": (lambda n, p: n.startswith(("0.", "18.")), False),
}


@pytest.mark.parametrize("bn_train", [False, True], ids=["bn_frozen_stats", "bn_batch_stats"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_gradients_equal_pytorch_on_conv_chain(case, bn_train):
    rule, x_grad = CASES[case]
    net = _chain()
    ref = Frozen(_freeze(net, rule), bn_train).train()
    eng = apply_engine(copy.deepcopy(ref)).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for _ in range(2):  # twice: running statistics must evolve identically
        _assert_same_training(ref, eng, x, x_grad)
        ref.zero_grad(set_to_none=True)
        eng.zero_grad(set_to_none=True)


def test_engine_modules_really_take_the_engine_path(monkeypatch):
    eng = apply_engine(Frozen(_freeze(_chain(), CASES["bias_only"][0])))
    counts = {}

    def counting(fn):
        orig = fn.apply

        def apply(*a):
            counts[fn.__name__] = counts.get(fn.__name__, 0) + 1
            return orig(*a)
        return apply

    for fn in (E.FrozenConv2dFn, E.FrozenBatchNormFn, E.InplaceFrozenBatchNormFn, E.MaskedActFn,
               E.FrozenLinearFn, E.AvgPool2dFn):
        monkeypatch.setattr(fn, "apply", counting(fn))
    eng.train()(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()
    # every norm of the chain follows its conv in the Sequential: normalised in place on its output
    assert counts == {"FrozenConv2dFn": 6, "InplaceFrozenBatchNormFn": 4, "MaskedActFn": 4, "FrozenLinearFn": 2,
                      "AvgPool2dFn": 1}


def test_batchnorm_batch_stats_running_update_matches_pytorch():
    for momentum in (0.1, None):
        bn = nn.BatchNorm2d(6, momentum=momentum).double()
        _randomize_norms(bn)
        bn.weight.requires_grad_(False)
        eng = apply_engine(copy.deepcopy(bn))
        assert type(eng) is E.MemBatchNorm2d
        x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
        for _ in range(3):
            _assert_same_training(bn.train(), eng.train(), x, x_grad=True)
        assert int(eng.num_batches_tracked) == 3


@pytest.mark.parametrize("bn_train", [False, True], ids=["bn_frozen_stats", "bn_batch_stats"])
def test_timm_batchnorm_act(bn_train):
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU6), nn.Conv2d(8, 4, 1),
                        BatchNormAct2d(4, act_layer=nn.Hardswish)).double()
    _randomize_norms(net)
    ref = Frozen(_freeze(net, lambda n, p: n.endswith("bias")), bn_train)
    eng = apply_engine(copy.deepcopy(ref))
    assert type(eng.net[1]) is E.MemBatchNormAct2d
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_same_training(ref, eng, x)
    mask = 2 * 8 * 8 * 8 // 8
    hswish_input = 2 * 4 * 8 * 8 * 8
    # batch statistics: each BN keeps its (float64) input and per-channel mean + invstd
    bn_kept = (2 * 8 * 8 * 8 + 2 * 4 * 8 * 8) * 8 + (8 + 4) * 2 * 8 if bn_train else 0
    assert measure_saved_bytes(eng, x) == mask + hswish_input + bn_kept


def test_relu6_inplace_semantics():
    m = E.MemReLU6(inplace=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    h = x * 2  # non-leaf, so in place is legal
    y = m(h)
    assert y is h and float(h.detach().max()) <= 6 and float(h.detach().min()) >= 0
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    expect = ((x * 2 > 0) & (x * 2 < 6)).float() * 2 * torch.arange(y.numel()).view_as(y)
    torch.testing.assert_close(x.grad, expect)
    with pytest.raises(RuntimeError):  # like PyTorch: a leaf that requires grad cannot be clamped in place
        m(torch.randn(3, requires_grad=True))


def test_weight_standardised_conv_and_avgpool_keep_less_with_same_gradients():
    from timm.layers import StdConv2d

    net = nn.Sequential(StdConv2d(4, 8, 3, padding=1, groups=2, bias=True), nn.ReLU(inplace=True), nn.AvgPool2d(2),
                        StdConv2d(8, 6, 1)).double()
    _freeze(net, lambda n, p: not n.startswith("3."))
    ref = Frozen(net)
    eng = apply_engine(copy.deepcopy(ref))
    assert type(eng.net[0]) is E.MemStdConv2d and type(eng.net[2]) is E.MemAvgPool2d
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert _assert_same_training(ref, eng, x) == 2
    # kept: conv0 keeps nothing (input is the batch; the raw weight is a parameter), the ReLU a
    # mask, the pool nothing, conv3 (frozen weight, input needs grad) nothing
    assert measure_saved_bytes(eng, x) == 2 * 8 * 8 * 8 // 8
    # PyTorch: the WS weight copies, the float ReLU output (= the pool input), conv3's input
    assert measure_saved_bytes(ref, x) >= 8 * 2 * 9 * 4 + 2 * 8 * 8 * 8 * 4 + 2 * 8 * 4 * 4 * 4


# ----------------------------------------------------------------------------- kept bytes, exactly
def _tiny(dtype=torch.float32):
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),  # frozen, bias trains
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),  # weight trains
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),  # frozen head
    ).to(dtype)
    return Frozen(_freeze(net, lambda n, p: n in ("1.bias", "3.weight")))


def test_kept_bytes_equal_hand_count():
    x = torch.randn(2, 3, 16, 16)
    eng = apply_engine(_tiny())
    rep = measure_saved(eng, x)
    relu6_mask = 2 * 8 * 16 * 16 // 8  # 1 bit per element
    conv_input = 2 * 8 * 16 * 16 * 4  # the trainable conv keeps its input (float)
    relu_mask = 2 * 16 * 8 * 8 // 8
    assert rep.bytes == relu6_mask + conv_input + relu_mask
    assert rep.by_dtype == {"torch.uint8": relu6_mask + relu_mask, "torch.float32": conv_input}
    assert measure_saved_bytes(_tiny(), x) >= 3 * conv_input  # plain PyTorch: BN input, ReLU6 output, ...


def test_frozen_conv_then_relu6_keeps_exactly_the_mask():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    conv.weight.requires_grad_(False)
    bias = nn.Parameter(torch.zeros(1, 8, 1, 1))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bias, self.act = conv, bias, nn.ReLU6(inplace=True)

        def forward(self, x):
            return self.act(self.conv(x) + self.bias)

    m = apply_engine(M())
    x = torch.randn(4, 3, 10, 10)
    assert measure_saved_bytes(m, x) == 4 * 8 * 10 * 10 // 8
    remove_engine(m)
    assert measure_saved_bytes(m, x) == 4 * 8 * 10 * 10 * 4  # PyTorch keeps the float output


def test_last_only_keeps_only_the_head_input():
    m = apply_engine(_tiny())
    for p in m.parameters():
        p.requires_grad_(False)
    head = m.net[7]
    head.weight.requires_grad_(True)
    assert measure_saved_bytes(m, torch.randn(2, 3, 16, 16)) == 2 * 16 * 4


# ----------------------------------------------------------------------------- TransferModel matrix
METHODS_UNDER_TEST = ("repnet", "bias", "last", "tinytl_lb", "full", "norm_last")


def _matrix():
    """Every method on both backbones (the method's default norm mode), plus the other norm
    mode where it changes what the engine does."""
    methods = [m for m in METHODS_UNDER_TEST if m in repnet.METHODS]
    cases = [(m, b, None, torch.float64) for m in methods for b in ("proxylessnas_mobile", "mobilenet_v2")]
    for m in ("repnet", "bias", "tinytl_lb"):
        if m in methods:
            other = "batch" if repnet.METHODS.get(m).Options().bn == "frozen" else "frozen"
            cases += [(m, b, other, torch.float64) for b in ("proxylessnas_mobile", "mobilenet_v2")]
    # TF-"same" convs: EfficientNet-Lite's static-padding conv, timm's Conv2dSame
    cases += [(m, b, None, torch.float64) for m in ("repnet", "bias") if m in methods
              for b in ("efficientnet_lite0", "timm:tf_efficientnet_lite0")]
    cases += [("bias", "timm:resnet18", None, torch.float64)]  # max pooling on the engine
    return cases


@pytest.fixture
def fuse_small_maps(monkeypatch):
    """Fused inverted-residual cores (ops.fused) at test resolutions too: no minimum slice size."""
    from repnet.memory.ops import fused

    monkeypatch.setattr(fused, "MIN_SLICE_BYTES", 0)


@pytest.mark.parametrize("method,backbone,bn,dtype", _matrix())
def test_engine_gradients_equal_pytorch_on_transfer_models(method, backbone, bn, dtype, fuse_small_maps):
    opts = {"bn": bn} if bn else {}
    ref = repnet.get_model(backbone, method, 5, image_size=64, pretrained=False, memory="vanilla", **opts).to(dtype)
    assert not engine_applied(ref)
    _randomize_norms(ref)
    with torch.no_grad():  # zero-initialised gammas would hide gradient paths
        for n, p in ref.named_parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.5)
    eng = apply_engine(copy.deepcopy(ref))
    # the engine runs NHWC (oneDNN reads it without reordering): plain PyTorch runs in the same
    # layout, so the trainable convs' kernels sum in the same order
    ref.to(memory_format=torch.channels_last).train()
    eng.train()
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    assert _assert_same_training(ref, eng, x, tol=tol) > 0


@pytest.mark.parametrize("method,backbone", sorted({(m, b) for m, b, bn, _ in _matrix() if bn is None
                                                    and m != "full" and "efficientnet" not in b}))
def test_int8_at_rest_gradients_equal_pytorch_on_the_dequantised_weights(method, backbone, fuse_small_maps):
    """Frozen weights stored as int8 codes + scales (what `repnet profile` measures by default): the
    step equals plain PyTorch holding the same dequantised weights as float parameters (fp64).
    (``full`` freezes nothing; EfficientNet-Lite's TF-"same" convs keep float weights.)"""
    eng = repnet.get_model(backbone, method, 5, image_size=64, pretrained=False, frozen_bits="linear")
    _randomize_norms(eng)
    with torch.no_grad():
        for p in eng.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.5)
    eng = eng.double()
    assert quantized_weight_numel(eng) > 0
    ref = remove_engine(copy.deepcopy(eng))  # float parameters = codes x scale, plain PyTorch modules
    assert not engine_applied(ref) and quantized_weight_numel(ref) == 0
    ref.to(memory_format=torch.channels_last).train()
    eng.train()
    assert _assert_same_training(ref, eng, torch.randn(2, 3, 64, 64, dtype=torch.float64)) > 0


def test_get_model_applies_engine_and_state_dict_is_unchanged():
    m = repnet.get_model("proxylessnas_mobile", "bias", 5, image_size=64, pretrained=False)
    v = repnet.get_model("proxylessnas_mobile", "bias", 5, image_size=64, pretrained=False, memory="vanilla")
    assert engine_applied(m) and not engine_applied(v)
    assert list(m.state_dict()) == list(v.state_dict())
    types = {type(x) for x in m.modules()}
    assert E.MemConv2d in types and E.MemBatchNorm2d in types and E.MemReLU6 in types
    assert nn.Conv2d not in types and nn.ReLU6 not in types
    apply_engine(m)  # idempotent
    assert E.MemConv2d in {type(x) for x in m.modules()}
    m2 = pickle.loads(pickle.dumps(m))
    assert engine_applied(m2)
    remove_engine(m)
    assert not engine_applied(m) and nn.Conv2d in {type(x) for x in m.modules()}


def test_engine_steps_aside_without_autograd():
    m = apply_engine(_tiny())
    with torch.no_grad():
        y = m(torch.randn(1, 3, 8, 8))
    assert y.grad_fn is None
    x = torch.randn(1, 3, 8, 8)
    m.net[1].bias.requires_grad_(False)
    m.net[3].weight.requires_grad_(False)
    assert m(x).grad_fn is None  # nothing trains, nothing needs a graph


# ----------------------------------------------------------------------------- MobileTL step backward
def test_step_backward_is_opt_in_and_keeps_a_mask():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 1), nn.Hardswish())
    _freeze(net, lambda n, p: n.startswith("0."))
    x = torch.randn(2, 3, 6, 6)
    m = apply_engine(copy.deepcopy(net))
    exact = measure_saved_bytes(m, x)
    assert set_step_backward(m, True) == 2
    h = m[0](x)
    pre = m[2](torch.clamp(h, 0, 6))
    mask_bytes = 2 * 8 * 6 * 6 // 8
    assert measure_saved_bytes(m, x) == 2 * mask_bytes  # ReLU6 and Hardswish each keep a mask
    assert exact == mask_bytes + 2 * 8 * 6 * 6 * 4  # exact hardswish keeps its input
    # gradient of hardswish is now 1[x >= 0]
    z = pre.detach().requires_grad_()
    m[3](z * 1.0).sum().backward()
    torch.testing.assert_close(z.grad, (z >= 0).float())
    set_step_backward(m, False)
    assert measure_saved_bytes(m, x) == exact


# ----------------------------------------------------------------------------- 8-bit frozen weights
def _param_storage_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("scheme", ["kmeans", "linear"])
def test_quantized_frozen_weights(scheme):
    torch.manual_seed(0)
    m = repnet.get_model("proxylessnas_mobile", "bias", 5, image_size=64, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m.backbone(x)
    frozen_w = sum(mod.weight.numel() for mod in m.modules()
                   if isinstance(mod, (nn.Conv2d, nn.Linear)) and not mod.weight.requires_grad)
    before = _param_storage_bytes(m)
    quantize_frozen_weights(m, scheme)
    after = _param_storage_bytes(m)
    assert before - after >= 3 * frozen_w * 0.97  # 4 bytes -> 1 byte per frozen weight (+ tiny tables)
    assert any(is_quantized(mod) for mod in m.modules())
    assert not is_quantized(m.head[1])  # the trainable classifier stays float
    with torch.no_grad():
        got = m.backbone(x)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)  # 8-bit per-tensor codebook / per-channel int8 on a random-init net
    assert any(k.endswith("weight_codes") for k in m.state_dict())
    # training still works, frozen weights keep nothing
    m.train()
    saved = measure_saved(m, x)
    assert saved.bytes < 200_000
    m(x).sum().backward()
    assert m.head[1].weight.grad is not None and m.backbone.model.first_conv.bn.bias.grad is not None
    remove_engine(m)
    assert not any(is_quantized(mod) for mod in m.modules())
    assert isinstance(m.backbone.model.first_conv.conv.weight, nn.Parameter)


def test_kmeans_codebook_exact_for_few_values_and_256_levels():
    w = torch.tensor([0.5, -1.0, 0.5, 2.0]).view(2, 2)
    codes, table = kmeans_codebook(w)
    assert torch.equal(table[codes.long()], w) and table.numel() == 256
    w = torch.randn(64, 32, 3, 3)
    codes, table = kmeans_codebook(w)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert (table[codes.long()] - w).abs().max() < 0.05


# ----------------------------------------------------------------------------- peak + profile
def test_peak_cpu_subprocess_sees_the_saving():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), *[
        layer for _ in range(4) for layer in (nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                              nn.ReLU6(inplace=True))
    ], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    ref = Frozen(_freeze(net, lambda n, p: n.startswith(("0.", "15."))))
    x = torch.randn(8, 3, 96, 96)
    kept_vanilla = measure_saved_bytes(ref, x)
    eng = apply_engine(copy.deepcopy(ref))
    kept_engine = measure_saved_bytes(eng, x)
    assert kept_engine == 8 * 32 * 96 * 96 * 4 // 8 + 8 * 32 * 4  # the four masks + the head input
    pv, pe = measure_peak_bytes(ref, x, threads=1), measure_peak_bytes(eng, x, threads=1)
    assert pv is not None and pe is not None
    assert pv > kept_vanilla * 0.8  # a real, whole-process figure at least as large as what is kept
    assert pe < pv - (kept_vanilla - kept_engine) * 0.5


def test_profile_keys_and_consistency():
    r = profile(repnet.get_model("proxylessnas_mobile", "bias", 10, image_size=64, pretrained=False), batch_size=2,
                peak=False)
    for k in ("trainable_params", "total_params", "analytic_mb", "analytic_saved_mb", "measured_saved_mb",
              "peak_mb", "analytic_frozen_bn_extra_mb"):
        assert k in r
    assert r["peak_mb"] is None and r["engine"] is True
    assert r["measured_saved_mb"] == pytest.approx(r["analytic_saved_mb"], rel=0.15)  # + the dropout mask
    v = profile(repnet.get_model("proxylessnas_mobile", "bias", 10, image_size=64, pretrained=False, memory="vanilla"),
                batch_size=2, peak=False)
    assert v["analytic_mb"] == r["analytic_mb"] and v["measured_saved_mb"] > 20 * r["measured_saved_mb"]


@pytest.mark.parametrize("backbone,same_type", [("efficientnet_lite0", "MemConv2dStaticSamePadding"),
                                                 ("timm:tf_efficientnet_lite0", "MemConv2dSame")])
def test_same_padding_convs_run_on_the_engine_and_pickle(backbone, same_type):
    m = repnet.get_model(backbone, "bias", 5, image_size=64, pretrained=False)
    names = {type(x).__name__ for x in m.modules()}
    assert same_type in names and "Conv2dStaticSamePadding" not in names and "Conv2dSame" not in names
    m2 = pickle.loads(pickle.dumps(m))
    assert same_type in {type(x).__name__ for x in m2.modules()}
    remove_engine(m)
    assert same_type not in {type(x).__name__ for x in m.modules()}


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", [
    (3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 1, 2, True), (2, None, 0, 1, True)])
def test_max_pool_keeps_one_byte_per_output_and_equals_pytorch(kernel, stride, padding, dilation, ceil):
    x = torch.randn(2, 3, 17, 18, dtype=torch.float64, requires_grad=True)
    ref = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    eng = apply_engine(nn.Sequential(nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)))[0]
    assert isinstance(eng, E.MemMaxPool2d)
    y = ref(x)
    g = torch.randn_like(y)
    assert torch.equal(eng(x), y)
    assert torch.equal(torch.autograd.grad(eng(x), x, g)[0], torch.autograd.grad(y, x, g)[0])
    assert measure_saved_bytes(eng, x) == y.numel()  # one uint8 window position per output
