"""Exported files: a program file with code is refused, a damaged adapter is not exported, an ONNX file runs alone."""
import pytest
import torch
import repnet
from repnet import RepnetError
from tests.helpers import evil_torch, flip_bytes, one_line


def test_exported_program_file_with_code_is_refused(tmp_path):
    from repnet.export.inference import load_exported

    evil_torch(tmp_path / "model.pt2", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        load_exported(tmp_path / "model.pt2")
    one_line(e)
    assert not (tmp_path / "marker").exists()


def test_flipped_bytes_in_an_adapter_are_detected_and_export_refuses(tmp_path):
    model = repnet.get_model("proxylessnas_mobile", "repnet", 5, image_size=32, pretrained=False)
    model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    flip_bytes(path, 8 + header + 200)
    with pytest.raises(RepnetError, match="damaged") as e:
        repnet.from_pretrained(str(tmp_path / "adapter"))
    one_line(e)


def test_exported_onnx_copied_alone_to_another_folder_runs(tmp_path):
    import shutil

    pytest.importorskip("onnxruntime")
    from repnet.export.inference import export_model, load_exported

    model = repnet.get_model("proxylessnas_mobile", "repnet", 3, image_size=32, pretrained=False)
    rep = export_model(model, tmp_path / "a" / "model.onnx")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.onnx"]
    assert rep["bytes"] == (tmp_path / "a" / "model.onnx").stat().st_size
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx")
    shutil.rmtree(tmp_path / "a")
    out = load_exported(tmp_path / "b" / "model.onnx")(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def _nan_adapter(tmp_path):
    """An adapter whose tensors hold a NaN and whose checksum is right (written past repnet's own writer,
    which refuses non-finite tensors: a diverged run's weights, or a crafted file)."""
    import json

    from safetensors.torch import save_file

    from repnet.storage import DIGEST_KEY, content_digest

    model = repnet.get_model("proxylessnas_mobile", "last", 3, image_size=32, pretrained=False)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(RepnetError, match="non-finite"):  # repnet never writes it
        model.head[-1].weight.data[0, 0] = float("nan")
        model.save_pretrained(str(tmp_path / "refused"))
    assert not (tmp_path / "refused" / "adapter.safetensors").exists()
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first].view(-1)[0] = float("nan")
    d = tmp_path / "nan-adapter"
    d.mkdir()
    save_file(tensors, str(d / "adapter.safetensors"),
              metadata={DIGEST_KEY: content_digest(dict(sorted(tensors.items())))})
    model.head[-1].weight.data[0, 0] = 0.0
    (d / "config.json").write_text(json.dumps(model.config()))
    return d, model


def test_a_nan_adapter_is_never_exported(tmp_path, capsys):
    from repnet.cli import main
    from repnet.export.inference import export_model

    d, model = _nan_adapter(tmp_path)
    with pytest.raises(RepnetError, match="holds non-finite values") as e:
        repnet.from_pretrained(str(d))
    one_line(e)
    for out in ("m.pt2", "m.pte"):
        argv = ["export", "--adapter", str(d), "--out", str(tmp_path / out)] + (["--training"] if out.endswith("pte") else [])
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "non-finite" in err, err
        assert not (tmp_path / out).exists()
    with torch.no_grad():  # the API: a model whose weights are not finite
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(RepnetError, match="non-finite") as e:
        export_model(model, tmp_path / "api.pt2")
    one_line(e)
    assert not (tmp_path / "api.pt2").exists()


def test_non_finite_outputs_are_not_verified(tmp_path, monkeypatch):
    """Finite weights whose exported program gives NaN: refused as unverified, nothing written."""
    import repnet.export.inference as inference

    model = repnet.get_model("proxylessnas_mobile", "last", 3, image_size=32, pretrained=False)
    monkeypatch.setattr(inference, "load_exported", lambda p: (lambda x: torch.full((x.shape[0], 3), float("nan"))))
    with pytest.raises(RepnetError, match="exported model's outputs are non-finite") as e:
        inference.export_model(model, tmp_path / "m.pt2")
    assert "not verified" in one_line(e)
    assert list(tmp_path.iterdir()) == []
