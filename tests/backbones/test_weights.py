"""Backbone weights from a user's file: weights only, a file with code is refused."""
import pytest
import repnet
from repnet import RepnetError
from tests.helpers import evil_torch, one_line


def test_weights_file_with_code_is_refused(tmp_path):
    evil_torch(tmp_path / "w.pth", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        repnet.get_model("proxylessnas_mobile", "last", 10, image_size=32, pretrained=str(tmp_path / "w.pth"))
    assert "refused" in one_line(e) and not (tmp_path / "marker").exists()
