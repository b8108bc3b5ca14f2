"""The files of a federated run: a crafted checkpoint is refused on resume; --flower-app never replaces a file it did not write."""
import pytest
from repnet.cli import main
from tests.helpers import evil_torch


def test_federated_resume_refuses_a_checkpoint_with_code(tmp_path, capsys):
    out = tmp_path / "fl"
    out.mkdir()
    evil_torch(out / "checkpoint.pt", tmp_path / "marker")
    code = main(["federated", "--dataset", "digits", "--backbone", "proxylessnas_mobile", "--clients", "2",
                 "--rounds", "1", "--out", str(out), "--resume", "--quiet", "--set", "random_init=true",
                 "--set", "image_size=32", "--set", "workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "refused" in err
    assert not (tmp_path / "marker").exists()


def test_flower_app_never_replaces_a_file_it_did_not_write(tmp_path):
    from repnet.errors import RepnetError
    from repnet.federated.run import write_app

    tiny = {"dataset": "digits", "backbone": "proxylessnas_mobile", "method": "last", "random_init": True}
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    with pytest.raises(RepnetError, match="not written by repnet"):
        write_app(str(app), tiny)
    assert (app / "pyproject.toml").read_text() == "[project]\nname = 'mine'\n"
    ours = tmp_path / "ours"
    first = write_app(str(ours), tiny, rounds=2).read_text()
    assert "num-server-rounds = 2" in first
    assert "num-server-rounds = 3" in write_app(str(ours), tiny, rounds=3).read_text()  # ours, unchanged: rewritten
    (ours / "pyproject.toml").write_text((ours / "pyproject.toml").read_text() + "# my edit\n")
    with pytest.raises(RepnetError, match="edited since"):
        write_app(str(ours), tiny, rounds=4)
    assert (ours / "pyproject.toml").read_text().endswith("# my edit\n")
