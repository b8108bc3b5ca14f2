"""The PEFT-like API (save / load) and the CLI contract."""
import json

import pytest
import torch
from safetensors.torch import load_file

import repnet
from repnet.cli import main


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


def test_cli_list(capsys):
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    for name in ["proxylessnas_mobile", "mobilenet_v2", "timm:<name>", "repnet", "bias", "last",
                 "--opt connector=dual [none|down|up|dual]"]:
        assert name in out


def test_cli_list_is_cached_by_the_package_source(tmp_path, monkeypatch):
    """The second `repnet list` prints the same text from the cache without importing torch; a
    changed source file is listed afresh."""
    import os
    import subprocess
    import sys

    from repnet.commands.list import cache_file

    env = {**os.environ, "REPNET_CACHE": str(tmp_path / "c")}
    probe = "import sys; from repnet.cli import main; main(['list']); print('torch' in sys.modules, file=sys.stderr)"
    runs = [subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True) for _ in range(2)]
    assert runs[0].stdout == runs[1].stdout and "hyblearn" in runs[0].stdout
    assert runs[0].stderr.strip().endswith("True") and runs[1].stderr.strip().endswith("False")
    monkeypatch.setenv("REPNET_CACHE", str(tmp_path / "c"))
    key = cache_file(False)
    assert key.is_file()
    import repnet.registry as reg

    st = os.stat(reg.__file__)
    try:
        os.utime(reg.__file__, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert cache_file(False) != key
    finally:
        os.utime(reg.__file__, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("argv,msg", [
    (["profile", "--method", "nope"], "error: unknown method 'nope'; choose from:"),
    (["profile", "--backbone", "vgg"], "error: unknown backbone 'vgg'; choose from:"),
    (["profile", "--opt", "connector"], "error: --opt expects key=value"),
    (["profile", "--opt", "connector=diagonal"], "error: option connector='diagonal' is not valid"),
    (["profile", "--weights", "/nonexistent.pth"], "error: weights file not found"),
])
def test_cli_errors_are_one_line(capsys, argv, msg):
    assert main(argv + ["--image-size", "64", "--no-measure", "--no-peak"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(msg) and err.count("\n") == 1


def test_cli_profile_writes_contract_keys(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["profile", "--backbone", "proxylessnas_mobile", "--method", "repnet", "--image-size", "64",
                 "--batch-size", "2", "--num-classes", "10", "--no-peak", "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    for key in ("backbone", "method", "image_size", "batch_size", "trainable_params", "total_params",
                "analytic_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb"):
        assert key in rec
    assert rec["peak_mb"] is None and rec["measured_saved_mb"] > 0 and rec["analytic_mb"] > rec["analytic_saved_mb"]
    m = repnet.get_model("proxylessnas_mobile", "repnet", 10, image_size=64, pretrained=False)
    assert rec["trainable_params"] == m.param_counts()[0]
    assert "analytic MB" in capsys.readouterr().out


def test_profile_prints_tinytl_reference_table(capsys):
    from repnet.cli import main

    assert main(["profile", "--method", "last", "--image-size", "64", "--no-measure", "--tinytl-reference"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0] + line.split()[1]: line.split() for line in out.splitlines()
             if line.split() and line.split()[0] in ("last", "full", "tinytl_lb") and len(line.split()) == 5}
    assert lines["last224"][2:] == ["30.80", "29.01", "30.83"]
    assert lines["full224"][2:] == ["390.80", "366.97", "390.84"]
    assert lines["tinytl_lb320"][2:] == ["64.70", "64.70", "64.70"]
