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
