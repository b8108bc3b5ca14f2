"""Every registered method x backbones: what trains, what stays bitwise frozen, initial
equivalence, save / load, and the method-specific structure (connectors, TinyTL, MobileTL, ...)."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import repnet
from repnet.methods.base import NORM_TYPES

SIZE = 64
METHODS = repnet.METHODS.names()
BACKBONES = [("proxylessnas_mobile", False), ("mobilenet_v2", True), ("timm:efficientnet_b0", False)]


def _engine_available() -> bool:
    try:
        from repnet.memory import apply_engine  # noqa: F401
    except ImportError:
        return False
    return True


MEMORY = ["vanilla", "engine"] if _engine_available() else ["vanilla"]


def _model(backbone, method, pretrained, memory="vanilla", **opts):
    return repnet.get_model(backbone, method, 5, image_size=SIZE, pretrained=pretrained, memory=memory, **opts)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([1, 3])


def _step(model, opt, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- one step, everything
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("backbone,pretrained", BACKBONES, ids=[b for b, _ in BACKBONES])
@pytest.mark.parametrize("method", METHODS)
def test_init_equivalence_training_and_save_load(method, backbone, pretrained, memory, tmp_path):
    torch.manual_seed(7)  # a randomly initialised backbone is rebuilt identically by from_pretrained
    model = _model(backbone, method, pretrained, memory)
    trainable = _trainable_names(model)
    keys = set(model.trainable_state_keys())
    assert trainable and trainable <= keys
    x, y = _batch()
    # at initialisation every method computes the frozen backbone with the new head
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.head(model.backbone(x)), atol=1e-5, rtol=0)
    before = _snapshot(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, opt, x, y)
    # every trainable tensor got a gradient (zero-initialised gates may make it all-zero at step 1)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable tensors without gradient: {no_grad[:5]}"
    # frozen parameters and buffers outside the trained state are bitwise unchanged
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= keys, f"frozen tensors changed: {sorted(changed - keys)[:5]}"
    # one more step: now every trainable tensor has moved (gates opened at step 1)
    _step(model, opt, *_batch(2))
    after = model.state_dict()
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    assert not unchanged, f"trainable tensors that never changed: {unchanged[:5]}"
    assert {k for k in before if not torch.equal(before[k], after[k])} <= keys

    # save / load round trip: only the trained state is written, logits are identical
    model.eval()
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    assert set(saved) == keys
    assert not {n for n, p in model.named_parameters() if not p.requires_grad} & set(saved)
    torch.manual_seed(7)
    loaded = repnet.from_pretrained(tmp_path / "a", memory=memory).eval()
    clone = copy.deepcopy(model)  # hooks are bound methods: they follow the copy
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model(x), clone(x))
    other = "mobilenet_v2" if backbone != "mobilenet_v2" else "proxylessnas_mobile"
    with pytest.raises(repnet.RepnetError, match=f"trained on backbone '{backbone}', not '{other}'"):
        repnet.from_pretrained(tmp_path / "a", backbone=other)


# ----------------------------------------------------------------------------- trainable sets
def _backbone(names):
    return {n for n in names if n.startswith("backbone.")}


def _biases(model):
    return {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith("bias")}


HEAD = {"head.1.weight", "head.1.bias"}


@pytest.mark.parametrize("backbone,pretrained", BACKBONES[:2], ids=[b for b, _ in BACKBONES[:2]])
def test_trainable_sets_match_definitions(backbone, pretrained):
    def tr(method, **o):
        m = _model(backbone, method, pretrained, **o)
        return m, _trainable_names(m)

    m, t = tr("last")
    assert t == HEAD
    m, t = tr("bias")
    assert t == HEAD | _biases(m)
    m, t = tr("full")
    assert t == {n for n, _ in m.named_parameters()}
    m, t = tr("norm_last")
    norms = {f"backbone.{n}.{pn}" for n, mod in m.backbone.named_modules() if isinstance(mod, NORM_TYPES)
             for pn, _ in mod.named_parameters(recurse=False)}
    assert t == HEAD | norms
    m, t = tr("repnet")
    assert t == HEAD | _biases(m) | {n for n, _ in m.named_parameters() if n.startswith("repnet.")}
    m, t = tr("repnet", train_bias=False)
    assert not _backbone(t)
    m, t = tr("tinytl_l")
    lite = {n for n, _ in m.named_parameters() if n.startswith("lite.")}
    assert t == HEAD | lite
    m, t = tr("tinytl_lb")
    lite = {n for n, _ in m.named_parameters() if n.startswith("lite.")}
    assert t == HEAD | _biases(m) | {n for n in lite if not n.endswith("bn2.bias")}
    m, t = tr("input_reprogram")
    assert t == {"program.delta"} and m.program.delta.shape == (3, SIZE, SIZE)
    m, t = tr("input_reprogram_last")
    assert t == {"program.delta"} | HEAD
    m, t = tr("side_tuning")
    assert not _backbone(t) and HEAD <= t and {n.split(".")[0] for n in t} == {"side", "down", "up", "head"}
    last = len(m.taps) - 1
    assert {n for n, _ in m.named_parameters() if n.startswith(("side.", "down.", "up.")) and n not in t} == {
        n for j in range(last) for n in (f"down.{j}.1.bias", f"side.{j}.bn2.bias")}
    m, t = tr("da3")
    assert t == HEAD | _biases(m) | {n for n, _ in m.named_parameters() if n.startswith("adaptors.")}
    m, t = tr("da3", train_bias=False)
    assert not _backbone(t)


def test_repnet_runs_on_timm_cnns_without_backbone_code():
    for name in ["timm:efficientnet_b0", "timm:resnet18", "timm:regnetx_002", "timm:convnext_atto"]:
        m = _model(name, "repnet", False).train()
        assert len(m.repnet) == len(m.backbone.stage_starts(SIZE)) >= 3
        modules = {n for n, _ in m.named_parameters() if n.startswith("repnet.")}
        assert _trainable_names(m) == HEAD | _biases(m) | modules
        loss = m(_batch()[0]).logsumexp(1).mean()
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad), name
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad), name


# ----------------------------------------------------------------------------- Rep-Net connectors
def _randomise_gammas(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.repnet:
            mod.bn2.weight.copy_(torch.rand(mod.bn2.weight.shape, generator=g) + 0.5)


def _trace(model, x):
    """Inputs of the backbone blocks just after each connector, and of each Rep-Net module."""
    rec, handles = {}, []
    blocks = model.backbone.blocks()
    for b in model.connectors[:-1]:
        handles.append(blocks[b + 1].register_forward_pre_hook(
            lambda mod, args, b=b: rec.__setitem__(("backbone", b), args[0].clone())))
    for j, mod in enumerate(model.repnet):
        handles.append(mod.register_forward_pre_hook(
            lambda mod, args, j=j: rec.__setitem__(("module", j), args[0].clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return rec


def _changed(a, b, kind, start=1):
    return [k for k in a if k[0] == kind and k[1] >= start and not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("backbone,pretrained", BACKBONES[:2], ids=[b for b, _ in BACKBONES[:2]])
@pytest.mark.parametrize("connector,backbone_reads_p,modules_read_x", [
    ("none", False, False), ("down", True, False), ("up", False, True), ("dual", True, True)])
def test_connector_dependency_structure(backbone, pretrained, connector, backbone_reads_p, modules_read_x):
    model = _model(backbone, "repnet", pretrained, connector=connector).eval()
    _randomise_gammas(model)
    x, _ = _batch()
    base = _trace(model, x)
    # (a) perturb the backbone between the 2nd and 3rd connector: do modules 2.. see it?
    perturbed = copy.deepcopy(model)
    blk = perturbed.backbone.blocks()[model.connectors[1] + 1]
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    a = _trace(perturbed, x)
    assert bool(_changed(base, a, "module", start=2)) == modules_read_x
    assert _changed(base, a, "backbone", start=model.connectors[2])  # the backbone itself sees it
    # (b) perturb Rep-Net module 1: does the backbone see it?
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.repnet[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    b = _trace(perturbed, x)
    assert bool(_changed(base, b, "backbone")) == backbone_reads_p
    assert _changed(base, b, "module", start=2)  # the Rep-Net chain always carries p
    if not backbone_reads_p:  # up / none: the backbone's features are exactly the plain backbone's
        feats = {}
        h = model.backbone.blocks()[model.connectors[-2]].register_forward_hook(
            lambda mod, args, out: feats.__setitem__("x", out))
        with torch.no_grad():
            model(x)
            inside = feats["x"]
            model.backbone(x)
        h.remove()
        assert torch.equal(inside, feats["x"])


# ----------------------------------------------------------------------------- TinyTL
def test_tinytl_structure_on_proxyless():
    m = repnet.get_model("proxylessnas_mobile", "tinytl_lb", 10, image_size=224, pretrained=False, memory="vanilla")
    assert m.lite_blocks == [1, 2] + list(range(5, 22))  # 19 modules, zero blocks 3 and 4 skipped
    assert [mod.conv1.kernel_size[0] for mod in m.lite] == [5] * 15 + [3] * 4  # blocks 18-21 use 3
    infos = m.backbone.describe(224)
    for b, mod in zip(m.lite_blocks, m.lite):
        assert mod.conv1.stride[0] == infos[b].stride and mod.conv1.groups == 2 and mod.pool.kernel_size == 2
        assert mod.conv1.in_channels == infos[b].in_channels and mod.conv2.out_channels == infos[b].out_channels
        assert mod.bn1.eps == 1e-3 and torch.count_nonzero(mod.bn2.weight) == 0
    assert not m.lite[0].bn2.bias.requires_grad and m.lite[0].bn2.weight.requires_grad
    l_only = repnet.get_model("proxylessnas_mobile", "tinytl_l", 10, image_size=224, pretrained=False, memory="vanilla")
    assert l_only.lite[0].bn2.bias.requires_grad
    assert not any(p.requires_grad for p in l_only.backbone.parameters())


def test_tinytl_kernel_rule():
    from repnet.methods.tinytl import lite_residual_kernels

    # ProxylessNAS-Mobile strides per stage start: the 8 px nominal map after block 17 gives k = 3
    assert lite_residual_kernels([2, 1, 2, 2, 1, 2, 1]) == [(5, 2)] * 6 + [(3, 2)]
    # a nominal resolution of 1 after halving: 1x1 kernel, no pooling
    assert lite_residual_kernels([2] * 8)[-2:] == [(1, 1), (1, 1)]


# ----------------------------------------------------------------------------- MobileTL
def test_mobiletl_structure():
    m = _model("proxylessnas_mobile", "mobiletl", False, k=4)
    assert m.tuned_blocks == [18, 19, 20, 21]
    t = _trainable_names(m)
    for b in range(22):
        inside = {n for n in t if n.startswith(f"backbone.model.blocks.{b}.")}
        assert bool(inside) == (b >= 18)
    for b in range(18, 22):
        pre = f"backbone.model.blocks.{b}.mobile_inverted_conv."
        for conv in ("inverted_bottleneck", "depth_conv", "point_linear"):
            assert pre + f"{conv}.conv.weight" in t
            assert pre + f"{conv}.bn.bias" in t
        # norms followed by ReLU6: shift only; the block's last (linear) norm: fully
        assert pre + "inverted_bottleneck.bn.weight" not in t and pre + "depth_conv.bn.weight" not in t
        assert pre + "point_linear.bn.weight" in t
    assert {"backbone.model.feature_mix_layer.conv.weight", "backbone.model.feature_mix_layer.bn.bias"} <= t
    assert "backbone.model.feature_mix_layer.bn.weight" not in t
    assert "backbone.model.first_conv.conv.weight" not in t
    m = _model("proxylessnas_mobile", "mobiletl", False, k=2, train_top=False)
    assert not {n for n in _trainable_names(m) if "feature_mix" in n}
    with pytest.raises(repnet.RepnetError, match="k=0"):
        _model("proxylessnas_mobile", "mobiletl", False, k=0)


@pytest.mark.parametrize("memory", MEMORY)
def test_mobiletl_step_backward_and_detached_input(memory):
    """ReLU6 backward in the tuned blocks is the step 1[x >= 0] (passes gradient above 6 too)."""
    m = _model("mobilenet_v2", "mobiletl", True, memory, k=2).train()
    m_exact = _model("mobilenet_v2", "mobiletl", True, memory, k=2, step_backward=False).train()
    m_exact.load_state_dict(m.state_dict())
    rec = []
    for model in (m, m_exact):
        mods = dict(model.backbone.model.named_modules())
        acts = [mods[n] for n in model.tuned_modules if isinstance(mods[n], torch.nn.ReLU6)]
        assert acts
        for act in acts:
            act.register_forward_pre_hook(lambda mod, args: rec.append(float(args[0].detach().max())))
        if memory == "engine":  # the engine's bit-packed step masks do it (the hooks step aside)
            assert all(type(a).__name__ == "MemReLU6" and a.step_backward == (model is m) for a in acts)
    x = _batch()[0] * 4  # large inputs: some pre-activations exceed 6
    grads = []
    for model in (m, m_exact):
        model.zero_grad()
        inp = {}
        h = model.backbone.blocks()[model.tuned_blocks[0]].register_forward_pre_hook(
            lambda mod, args: inp.__setitem__("x", args[0]))
        torch.manual_seed(0)
        model(x).logsumexp(1).sum().backward()
        h.remove()
        assert not inp["x"].requires_grad  # nothing below the tuned blocks gets gradients
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert any(not torch.equal(a, b) for a, b in zip(*grads))
    assert max(rec) > 6  # where exact ReLU6 backward is 0, the step passes the gradient


def test_step_backward_function():
    from repnet.methods.mobiletl import StepBackward

    for act in (torch.nn.ReLU6(inplace=True), torch.nn.Hardswish()):
        x = torch.linspace(-8, 8, 33, requires_grad=True)
        h = x * 1.0
        y = StepBackward.apply(h, h >= 0, act(h.detach()))
        torch.testing.assert_close(y, act(x.detach().clone()))
        y.backward(torch.full_like(y, 2.0))
        torch.testing.assert_close(x.grad, 2.0 * (x.detach() >= 0).float())


# ----------------------------------------------------------------------------- side tuning, DA3, input reprogramming
def test_side_tuning_never_backprops_through_the_backbone():
    m = _model("mobilenet_v2", "side_tuning", True).train()
    assert m.taps == m.backbone.stage_starts(SIZE)
    seen = []
    handles = [b.register_forward_hook(lambda mod, args, out: seen.append(out.requires_grad or out.grad_fn is not None))
               for b in m.backbone.blocks()]
    loss = m(_batch()[0]).logsumexp(1).mean()
    loss.backward()
    for h in handles:
        h.remove()
    assert seen and not any(seen)  # no backbone tensor is part of the autograd graph
    assert m.up.weight.grad.abs().sum() > 0


def test_da3_gate_skips_compute_at_inference():
    m = _model("mobilenet_v2", "da3", True, skip_threshold=1.0).eval()
    assert m.adaptor_blocks == m.backbone.stage_starts(SIZE)
    with torch.no_grad():
        for a in m.adaptors:
            a.bn2.weight.fill_(1.0)
    x, _ = _batch()
    with torch.no_grad():
        ref = m.head(m.backbone(x))
        assert torch.equal(m(x), ref)  # every gate < 1: every branch skipped
        assert m.skipped == [1] * len(m.adaptors)
        m.options.skip_threshold = 0.0
        assert not torch.allclose(m(x), ref)
    m.train()
    m.options.skip_threshold = 1.0
    m(x).sum().backward()  # training never skips
    assert all(a.fc1.weight.grad is not None for a in m.adaptors)


def test_input_reprogram_head_is_a_fixed_projection():
    a = _model("proxylessnas_mobile", "input_reprogram", False)
    torch.manual_seed(123)
    b = _model("proxylessnas_mobile", "input_reprogram", False)
    assert torch.equal(a.head[1].weight, b.head[1].weight)  # rebuilt identically, so never saved
    assert not a.head[1].weight.requires_grad
    x, _ = _batch()
    with torch.no_grad():
        a.program.delta.fill_(0.1)
        a.eval()
        torch.testing.assert_close(a(x), a.head(a.backbone(x + 0.1)))
        # an image of another size gets the perturbation resized
        assert a(torch.randn(1, 3, 96, 96)).shape == (1, 5)
