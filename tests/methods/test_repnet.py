"""Rep-Net itself: exact module shapes and parameter counts, connectors, initial equivalence."""
import pytest
import torch

import repnet


def _repnet_params(model):
    return sum(p.numel() for p in model.repnet.parameters())


@pytest.mark.parametrize("size,expected,kernels", [(224, 415_464, [5, 5, 5, 5, 3, 3]), (320, 784_104, [5] * 6)])
def test_proxyless_parameter_count_matches_paper(size, expected, kernels):
    m = repnet.get_model("proxylessnas_mobile", "repnet", 102, image_size=size, pretrained=False, memory="vanilla")
    assert m.connectors == [1, 5, 9, 13, 17, 21]
    assert _repnet_params(m) == expected
    assert [mod.conv1.kernel_size[0] for mod in m.repnet] == kernels
    assert [mod.conv1.groups for mod in m.repnet] == [1, 2, 2, 2, 2, 2]
    assert m.repnet[0].conv1.in_channels == 3 and m.repnet[0].conv1.out_channels == 8
    # head + backbone biases come on top
    biases = sum(p.numel() for n, p in m.backbone.named_parameters() if n.endswith("bias"))
    head = 1280 * 102 + 102
    assert m.param_counts()[0] == expected + biases + head


def test_module_shapes_follow_spec():
    m = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=224, pretrained=False, memory="vanilla")
    mod = m.repnet[3]  # at block 13: 80 -> 96
    assert (mod.conv1.in_channels, mod.conv1.out_channels, mod.conv2.out_channels) == (80, 80, 96)
    assert mod.bn1.eps == 1e-3 and mod.bn2.eps == 1e-3
    assert torch.count_nonzero(mod.bn2.weight) == 0
    assert m.repnet[0].pool.kernel_size == 4 and m.repnet[1].pool.kernel_size == 2


@pytest.mark.parametrize("backbone", ["proxylessnas_mobile", "mobilenet_v2"])
@pytest.mark.parametrize("connector", ["none", "down", "up", "dual"])
def test_initial_logits_equal_frozen_backbone(backbone, connector):
    m = repnet.get_model(backbone, "repnet", 7, image_size=64, pretrained=backbone == "mobilenet_v2",
                         memory="vanilla", connector=connector)
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = m.head(m.backbone(x))  # outside TransferModel.forward the hooks are inactive
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)


def test_all_layers_placement_and_options():
    m = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, memory="vanilla",
                         placement="all", train_bias="false", kernel="3", width="0.5")
    assert m.connectors == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(mod.conv1.kernel_size == (3, 3) for mod in m.repnet)
    assert m.repnet[1].conv1.out_channels == 16  # round8(32 * 0.5)


def test_bad_options_are_clear():
    with pytest.raises(repnet.RepnetError, match="option connector='sideways' is not valid; choose from: none, down, up, dual"):
        repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, connector="sideways")
    with pytest.raises(repnet.RepnetError, match="unknown option 'conector' for method 'repnet'; valid options: .*connector"):
        repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, conector="up")
    with pytest.raises(repnet.RepnetError, match="expected a bool"):
        repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, train_bias="maybe")
    with pytest.raises(repnet.RepnetError, match="unknown method 'repnett'; choose from: .*repnet"):
        repnet.get_model("proxylessnas_mobile", "repnett", 10, pretrained=False)


def test_bn_modes():
    frozen = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, memory="vanilla")
    batch = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False, memory="vanilla", bn="batch")
    frozen.train(), batch.train()
    bn = frozen.backbone.model.blocks[1].mobile_inverted_conv.depth_conv.bn
    assert not bn.training and frozen.repnet[0].bn1.training
    assert batch.backbone.model.blocks[1].mobile_inverted_conv.depth_conv.bn.training
    before = bn.running_mean.clone()
    frozen(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)


def test_ablation_options_ws_zero_init_image_pool():
    from timm.layers import StdConv2d

    kw = dict(image_size=64, pretrained=False, memory="vanilla")
    ref = repnet.get_model("mobilenet_v2", "repnet", 5, **kw)
    plain = repnet.get_model("mobilenet_v2", "repnet", 5, ws="false", zero_init="false", image_pool=1, **kw)
    assert isinstance(ref.repnet[2].conv1, StdConv2d) and not isinstance(plain.repnet[2].conv1, StdConv2d)
    assert plain.repnet[2].conv1.padding == ref.repnet[2].conv1.padding
    assert _repnet_params(plain) == _repnet_params(ref)  # same shapes, other parametrisation
    assert torch.count_nonzero(plain.repnet[3].bn2.weight) > 0
    seen = {}
    plain.repnet[0].register_forward_pre_hook(lambda mod, args: seen.update(shape=args[0].shape))
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    out = plain(x)
    assert seen["shape"][-1] == 64  # module 1 read the full-resolution image
    assert not torch.allclose(out, plain.head(plain.backbone(x)), atol=1e-4)  # gamma != 0: not the backbone
