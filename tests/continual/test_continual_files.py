"""The files of a continual run: adapters, multi-task models and resume state with code are refused."""
import pytest
import repnet
from repnet import RepnetError
from repnet.cli import main
from tests.helpers import evil_pickle, one_line


def test_adapter_and_multitask_files_with_code_are_refused(tmp_path):
    model = repnet.get_model("proxylessnas_mobile", "repnet", 5, image_size=32, pretrained=False)
    model.save_pretrained(str(tmp_path / "adapter"))
    evil_pickle(tmp_path / "adapter" / "adapter.safetensors", tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        repnet.from_pretrained(str(tmp_path / "adapter"))
    one_line(e)
    from repnet.continual.model import MultiTaskModel

    mt = MultiTaskModel("proxylessnas_mobile", image_size=32, pretrained=False)
    mt.add_task("a", 3, method="last")
    mt.save(tmp_path / "mt")
    task_file = next((tmp_path / "mt" / "tasks").glob("*.safetensors"))
    evil_pickle(task_file, tmp_path / "marker")
    with pytest.raises(RepnetError) as e:
        MultiTaskModel.load(tmp_path / "mt")
    one_line(e)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("method", ["last", "hyblearn"])
def test_continual_resume_refuses_files_with_code(tmp_path, capsys, monkeypatch, method):
    """``repnet continual --resume``: a crafted task file, backbone file or Hyb-Learn state."""
    from repnet.continual.model import MultiTaskModel

    real, calls = MultiTaskModel.save, {"n": 0}

    def crash_on_second(self, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, directory)

    out = tmp_path / "cl"
    args = ["continual", "--tasks", "digits,mnist5k", "--method", method, "--backbone", "proxylessnas_mobile",
            "--random-init", "--image-size", "32", "--epochs", "1", "--train-subset", "32", "--test-subset", "16",
            "--batch-size", "16", "--workers", "0", "--quiet", "--out", str(out)]
    if method == "hyblearn":
        args += ["--opt", "score_batches=1"]
    monkeypatch.setattr(MultiTaskModel, "save", crash_on_second)
    assert main(args) != 0  # interrupted while saving the second task
    monkeypatch.setattr(MultiTaskModel, "save", real)
    files = [*(out / "model" / "tasks").glob("*.safetensors"), *(out / "model").glob("backbone-*.safetensors"),
             *out.glob("hyblearn-state-*.safetensors")]
    assert len(files) == (3 if method == "hyblearn" else 1)
    for f in files:
        good = f.read_bytes()
        evil_pickle(f, tmp_path / "marker")
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and f.name in err, err
        f.write_bytes(good)
    assert not (tmp_path / "marker").exists()
