"""The command line: repnet list (and its cache), one-line errors, repnet profile's contract."""
import json
import pytest
import repnet
from repnet.cli import main


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
