"""Export: the exported program / ONNX file computes what the eager model computes, at any
batch size; bad input is one line; nothing half-written is left behind."""
import importlib.util
import os

import pytest
import torch

import repnet
from repnet import RepnetError
from repnet.cli import main
from repnet.export.inference import export_model, load_exported
from repnet.memory import quantize_frozen_weights

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _trained_like(method="repnet", size=32, backbone="proxylessnas_mobile", pretrained=False, **opts):
    """A small model whose trainable tensors are random (a zero-init head would hide mistakes)."""
    torch.manual_seed(0)
    m = repnet.get_model(backbone, method, num_classes=5, image_size=size, pretrained=pretrained, **opts)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("method", ["repnet", "tinytl_lb"])
def test_pt2_export_matches_eager_at_any_batch(tmp_path, method):
    m = _trained_like(method)
    rep = export_model(m, tmp_path / "m.pt2")
    assert rep["max_abs_diff"] is not None and rep["max_abs_diff"] <= 1e-4
    run = load_exported(tmp_path / "m.pt2")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = m(x)
        assert ref.abs().max() > 1e-3  # a non-trivial output
        torch.testing.assert_close(run(x), ref, rtol=1e-4, atol=1e-4)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind
    assert m.training is False and repnet.memory.engine_applied(m)  # the model itself is untouched


def test_export_of_8bit_weights_keeps_the_8bit_arithmetic(tmp_path):
    m = _trained_like()
    quantize_frozen_weights(m, "kmeans")
    export_model(m, tmp_path / "q.pt2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "q.pt2")(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extra (installed by scripts/setup.sh)")
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    m = _trained_like()
    rep = export_model(m, tmp_path / "m.onnx")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        assert rep["format"] == "onnx" and rep["max_abs_diff"] <= 1e-3 * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(load_exported(tmp_path / "m.onnx")(x), ref, rtol=1e-3, atol=1e-3)


def test_cli_export_from_saved_adapter_and_errors(tmp_path, capsys):
    m = _trained_like(backbone="mobilenet_v2", pretrained=True)  # the offline ImageNet weights
    m.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "cli.pt2"
    rc = main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "max |exported - eager|" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the export's own contract: within 1e-4 of the logits' scale (oneDNN picks kernels per CPU)
        ref = m(x)
        torch.testing.assert_close(load_exported(out)(x), ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))

    assert main(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(RepnetError, match="unknown export format"):
        export_model(m, tmp_path / "m.tflite")
    with pytest.raises(RepnetError, match="not a torch.export program"):
        (tmp_path / "junk.pt2").write_bytes(b"junk")
        load_exported(tmp_path / "junk.pt2")
