"""The papers' analytic memory model (docs/memory.md): hand counts, TinyTL's published figures,
and agreement with what the engine really keeps."""
import pytest
import torch
from torch import nn

import repnet
from repnet.reproduce.tinytl_memory import PUBLISHED, tinytl_configuration
from repnet.memory import analyze, apply_engine, format_breakdown, measure_saved, quantize_frozen_weights
from repnet.memory.analytic import param_bytes
from repnet.memory.engine import set_step_backward


def _tiny():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),  # frozen; BN bias trains
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),  # weight trains
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),  # frozen head
    )
    for n, p in net.named_parameters():
        p.requires_grad_(n in ("1.bias", "3.weight"))
    return net


def test_rules_by_hand_on_a_tiny_network():
    rep = analyze(_tiny(), image_size=16)
    rows = {r.name: r for r in rep.rows}
    x0, y0, y3 = 3 * 16 * 16, 8 * 16 * 16, 16 * 8 * 8
    # frozen conv: keeps nothing, transient = input + output
    assert (rows["0"].kept_bytes, rows["0"].transient_bytes) == (0, 4 * x0 + 4 * y0)
    # BN whose gamma is frozen (beta trains): keeps nothing
    assert (rows["1"].kept_bytes, rows["1"].transient_bytes) == (0, 4 * y0)
    # ReLU6 after a trainable bias: a 1-bit mask
    assert (rows["2"].kept_bytes, rows["2"].transient_bytes) == (y0 / 8, 4 * y0)
    # conv whose weight trains: keeps its input
    assert (rows["3"].kept_bytes, rows["3"].transient_bytes) == (4 * y0, 4 * y0 + 4 * y3)
    assert rows["4"].kept_bytes == y3 / 8
    assert rows["5"].kept_bytes == 0 and rows["5"].transient_bytes == 0  # pooling
    assert rows["7"].kept_bytes == 0 and rows["7"].transient_bytes == 4 * (16 + 4)
    assert rep.kept_bytes == y0 / 8 + 4 * y0 + y3 / 8
    # peak: at conv 3, its transient + the ReLU6 mask kept before it
    assert rep.peak_activation_bytes == 4 * y0 + 4 * y3 + y0 / 8 and rep.peak_layer == "3"
    assert rep.param_bytes == 4 * (8 + 8 * 16 * 9) + 1 * (3 * 8 * 9 + 8 + 16 + 16 * 4 + 4)
    assert rep.total_mb(8) == pytest.approx((rep.peak_activation_bytes * 8 + rep.param_bytes) / 1e6)
    assert rep.saved_mb(8) == pytest.approx(rep.kept_bytes * 8 / 1e6)


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.use_res_connect = True  # the shortcut convention ``has_shortcut`` reads
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


def test_residual_block_holds_its_input_while_it_runs():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), _Res(4), nn.Conv2d(4, 4, 1))
    for p in net.parameters():
        p.requires_grad_(False)
    net[0].bias.requires_grad_(True)
    rep = analyze(net, image_size=8)
    rows = {r.name: r for r in rep.rows}
    n = 4 * 8 * 8
    assert rows["1.conv"].residual_bytes == 4 * n and rows["2"].residual_bytes == 0
    assert rows["1.conv"].running_bytes == 4 * n + 4 * n + 4 * n  # transient (x + y) + held
    assert rows["1.act"].running_bytes == 4 * n + 4 * n  # transient + held (nothing kept before it)
    assert rep.kept_bytes == n / 8


def test_smooth_activations_and_step_backward():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.Sigmoid())
    for p in net[2].parameters():
        p.requires_grad_(False)
    n = 8 * 4 * 4
    rep = analyze(net, image_size=4)
    assert [r.kept_bytes for r in rep.rows] == [4 * 3 * 16, 4 * n, 0, 4 * n]  # conv0 trains: keeps its input
    set_step_backward(net, True)  # MobileTL: h-swish keeps a mask; the sigmoid is unaffected
    assert [r.kept_bytes for r in analyze(net, image_size=4).rows] == [4 * 3 * 16, n / 8, 0, 4 * n]


def test_param_bytes_count_8bit_codes_as_frozen():
    m = repnet.get_model("proxylessnas_mobile", "bias", 10, image_size=64, pretrained=False)
    b, t, total = param_bytes(m)
    assert b == 4 * t + (total - t)
    quantize_frozen_weights(m, "linear")
    b2, t2, total2 = param_bytes(m)
    assert (b2, t2, total2) == (b, t, total)


@pytest.mark.skipif("tinytl_lb" not in repnet.METHODS, reason="needs the tinytl_lb method")
@pytest.mark.parametrize("size,published", [(224, 37.1), (320, 64.7)])
def test_reproduces_tinytl_published_memory(size, published):
    """TinyTL-L+B on ProxylessNAS-Mobile, batch 8, 102 classes (the TinyTL paper's table; docs/memory.md)."""
    m = repnet.get_model("proxylessnas_mobile", "tinytl_lb", 102, image_size=size, pretrained=False)
    rep = analyze(m, size)
    assert rep.total_mb(8) == pytest.approx(published, abs=0.05)
    assert rep.frozen_bn_extra_bytes == 0  # frozen statistics by default


@pytest.mark.parametrize("method,size", [(m, s) for m, sizes in PUBLISHED.items() for s in sizes])
def test_every_tinytl_published_row_is_explained(method, size):
    """TinyTL's own table (FT-Last ... FT-Full): its script's network (lite residuals always
    inserted, per-method requires_grad) under its profiler's mask rule gives each figure."""
    model, require_backward = tinytl_configuration(method, size)
    rep = analyze(model, size, masks="always" if require_backward else "gradient")
    assert rep.total_mb(8) == pytest.approx(PUBLISHED[method][size], abs=0.05)


def test_tinytl_configuration_flags_follow_its_script():
    lite_params = None
    for method, expect in [("last", "head"), ("bias", "bias"), ("norm_last", "norm"), ("full", "all")]:
        model, require_backward = tinytl_configuration(method, 64, num_classes=5)
        assert require_backward == (method != "last")
        lite_params = sum(p.numel() for p in model.lite.parameters())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        head = {n for n, _ in model.head.named_parameters(prefix="head")}
        assert head <= trainable
        if expect == "head":
            assert trainable == head
        elif expect == "bias":  # every bias, the lite residuals' own included
            assert trainable == {n for n, _ in model.named_parameters() if n.endswith("bias")} | head
        elif expect == "norm":
            norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
            assert trainable - head == {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in norms}
            assert any(n.startswith("lite.") for n in trainable)
        else:
            assert len(trainable) == len(list(model.parameters()))
    assert lite_params > 0
    # where no gradient passes, the two mask rules differ by exactly the stem's and block 0's masks
    model, _ = tinytl_configuration("tinytl_l", 64, num_classes=5)
    a, b = analyze(model, 64), analyze(model, 64, masks="always")
    assert b.kept_bytes - a.kept_bytes == sum(r.in_numel / 8 for r in a.rows
                                              if r.type in ("ReLU", "ReLU6") and r.kept_bytes == 0)
    assert b.kept_bytes > a.kept_bytes
    with pytest.raises(ValueError):
        analyze(model, 64, masks="sometimes")


@pytest.mark.parametrize("backbone,method", [
    ("efficientnet_lite0", "bias"), ("efficientnet_lite0", "repnet"),  # TF-"same" static-padding convs
    ("timm:tf_efficientnet_lite0", "bias"),  # timm Conv2dSame
    ("resnet50", "bias"), ("timm:resnet18", "repnet"),  # max pooling (the engine keeps 1 B per output)
    ("mobilenet_v3_large", "bias"), ("timm:efficientnet_b0", "bias"),  # squeeze-excitation products
    ("timm:convnext_atto", "bias"),  # LayerNorm: per-sample statistics keep the input
])
def test_engine_keeps_what_the_rules_say_on_other_backbone_families(backbone, method):
    """The engine covers what these families add (same-padding convs: plain PyTorch keeps ~45x
    more; max pooling: ~4-16x) and the rules count what truly must be kept (SE, LayerNorm)."""
    m = repnet.get_model(backbone, method, 10, image_size=64, pretrained=False)
    rep = analyze(m, 64)
    measured = measure_saved(m, torch.randn(4, 3, 64, 64)).bytes
    assert 0.97 * rep.kept_bytes * 4 <= measured <= 1.15 * rep.kept_bytes * 4


@pytest.mark.parametrize("method", [m for m in ("bias", "last", "repnet", "tinytl_lb", "full", "norm_last", "da3")
                                    if m in repnet.METHODS])
def test_engine_keeps_what_the_rules_say(method):
    m = repnet.get_model("proxylessnas_mobile", method, 10, image_size=64, pretrained=False, bn="frozen")
    rep = analyze(m, 64)
    measured = measure_saved(m, torch.randn(4, 3, 64, 64)).bytes
    # the rules count a tensor kept by two layers twice (e.g. a block input read by a trained
    # conv and a side module); the engine keeps it once
    low = 0.95 if method in ("full", "norm_last") else 1.0
    assert low * rep.kept_bytes * 4 <= measured <= 1.15 * rep.kept_bytes * 4


def test_frozen_bn_with_batch_statistics_is_reported_and_matches_the_engine():
    m = repnet.get_model("proxylessnas_mobile", "bias", 10, image_size=64, pretrained=False, bn="batch")
    rep = analyze(m, 64)
    assert rep.frozen_bn_extra_bytes > 10 * rep.kept_bytes  # every BN input, in float
    measured = measure_saved(m, torch.randn(4, 3, 64, 64)).bytes
    assert measured == pytest.approx(4 * (rep.kept_bytes + rep.frozen_bn_extra_bytes), rel=0.05)
    # the papers' figure does not depend on it
    m2 = repnet.get_model("proxylessnas_mobile", "bias", 10, image_size=64, pretrained=False)
    assert analyze(m2, 64).total_mb(8) == pytest.approx(rep.total_mb(8))


def test_breakdown_printer():
    rep = analyze(apply_engine(_tiny()), image_size=16)
    text = format_breakdown(rep, batch=8)
    assert "MemConv2d" in text and "kept for backward" in text and f"{rep.total_mb(8):.2f} MB" in text
    assert len(rep.breakdown(8, top=2).splitlines()) == 2 + 2 + 2


def test_paper_execution_order_counts_module_1_before_the_stem():
    """order="paper": Rep-Net's module 1 runs before the backbone (the released code), so what it
    keeps is alive at the early peak - exactly its kept bytes more, nothing else changes."""
    m = repnet.get_model("proxylessnas_mobile", "repnet", 102, image_size=224, pretrained=False)
    run, paper = analyze(m, 224), analyze(m, 224, order="paper")
    module1 = sum(r.kept_bytes for r in run.rows if r.name.startswith("repnet.0."))
    assert module1 == 9408 + 25088 + 784 + 25088 + 100352  # 3x28x28 in, 8 / 8 / 32 channels at 28x28
    assert paper.kept_bytes == run.kept_bytes and len(paper.rows) == len(run.rows)
    assert paper.peak_activation_bytes == run.peak_activation_bytes + module1
    assert round(paper.total_mb(8) - run.total_mb(8), 2) == 1.29
    t = repnet.get_model("proxylessnas_mobile", "tinytl_lb", 102, image_size=224, pretrained=False)
    assert analyze(t, 224, order="paper").total_mb(8) == analyze(t, 224).total_mb(8)  # no prelude: unchanged
    with pytest.raises(ValueError, match="order must be one of"):
        analyze(m, 224, order="later")


def test_tensor_peak_counts_every_live_tensor_of_a_step_by_kind():
    """One Linear(1000, 1000), batch 8, Adam: the peak holds the weights, their gradients, Adam's two
    moments (+ its step counters), the batch and Adam's update temporaries - each exactly, by hand."""
    from repnet.memory.measure import measure_tensor_peak

    torch.manual_seed(0)
    m = nn.Linear(1000, 1000)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randn(8, 1000), torch.randint(0, 1000, (8,))
    r = measure_tensor_peak(m, x, y)
    w = 4 * (1000 * 1000 + 1000)
    k = r["by_kind"]
    assert k["parameter"] == w and k["gradient"] == w
    assert k["optimizer_state"] == 2 * w + 2 * 4          # exp_avg, exp_avg_sq, a float32 step per tensor
    assert k["input"] >= 4 * 8 * 1000 + 8 * 8            # the batch and its int64 labels
    # the peak is Adam's update: the output and the loss are gone (freed before the step, as a training
    # loop's next iteration frees them), Adam's foreach update holds two weight-sized temporaries
    assert k["activation"] == 0 and k["unknown"] == 2 * 4 * 1000 * 1000  # (those of the weight matrix)
    assert r["peak_bytes"] == sum(k.values()) >= 6 * w
    b = r["breakdown"]
    assert b["trainable_state"] == 4 * w + 2 * 4 and b["input"] == 4 * 8 * 1000 and b["frozen_weights"] == 0
    assert b["transient"] == r["peak_bytes"] - b["trainable_state"] - b["input"]
    assert r["trainable_weight_bytes"] == w and r["frozen_weight_bytes"] == 0
    assert all(torch.equal(v, before[n]) for n, v in m.state_dict().items()) and m.weight.grad is None
