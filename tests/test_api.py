"""The PEFT-like API (save / load) and the CLI contract."""
import json

import pytest
import torch
from safetensors.torch import load_file

import repnet


def _trained(model, steps=2):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("bn", ["frozen", "batch"])
def test_save_load_round_trip_identical_logits(tmp_path, bn):
    m = _trained(repnet.get_model("mobilenet_v2", "repnet", 5, image_size=64, memory="vanilla", bn=bn))
    m.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    assert set(saved) == set(m.trainable_state_keys())
    # only trained tensors: no frozen backbone weight is in the file
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert not frozen & set(saved)
    assert any(k.startswith("repnet.") for k in saved) and "head.1.weight" in saved
    assert any("running_mean" in k and k.startswith("backbone.") for k in saved) == (bn == "batch")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["backbone"] == "mobilenet_v2" and cfg["options"]["connector"] == "dual"
    m2 = repnet.from_pretrained(tmp_path / "a", memory="vanilla").eval()
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(m(x), m2(x))


def test_from_pretrained_refuses_other_backbone(tmp_path):
    m = repnet.get_model("proxylessnas_mobile", "bias", 5, image_size=64, pretrained=False, memory="vanilla")
    m.save_pretrained(tmp_path / "a")
    with pytest.raises(repnet.RepnetError, match="trained on backbone 'proxylessnas_mobile', not 'mobilenet_v2'"):
        repnet.from_pretrained(tmp_path / "a", backbone="mobilenet_v2")
    # same architecture, other weights: the fingerprint catches it
    other = repnet.get_model("proxylessnas_mobile", "bias", 5, image_size=64, pretrained=False)
    path = tmp_path / "other.pth"
    torch.save(other.backbone.model.state_dict(), path)
    with pytest.raises(repnet.RepnetError, match="backbone weights do not match"):
        repnet.from_pretrained(tmp_path / "a", pretrained=str(path))
    with pytest.raises(repnet.RepnetError, match="is not a saved repnet adapter"):
        repnet.from_pretrained(tmp_path / "missing")


def test_construction_options_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = repnet.get_model("proxylessnas_mobile", "repnet", 4, image_size=32, pretrained=False,
                             int8={"rounding": "nearest", "master": "int8"})
    cfg = model.config()
    assert cfg["memory"] == "engine" and cfg["int8"]["rounding"] == "nearest" and cfg["int8"]["master"] == "int8"
    model.save_pretrained(str(tmp_path / "a"))
    torch.manual_seed(0)
    loaded = repnet.from_pretrained(str(tmp_path / "a"))
    assert loaded.config() == cfg
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    torch.manual_seed(1)
    plain = repnet.get_model("proxylessnas_mobile", "last", 4, image_size=32, pretrained=False, memory="vanilla",
                             frozen_bits="linear")
    plain.save_pretrained(str(tmp_path / "b"))
    torch.manual_seed(1)
    back = repnet.from_pretrained(str(tmp_path / "b"))
    assert back.config()["memory"] == "vanilla" and back.config()["frozen_bits"] == "linear"


def test_get_model_builds_on_a_shared_backbone_object():
    bb = repnet.create_backbone("proxylessnas_mobile", pretrained=False)
    a = repnet.get_model(bb, "repnet", 3, image_size=32, train_bias=False)
    b = repnet.get_model(bb, "last", 5, image_size=32)
    assert a.backbone is b.backbone is bb
