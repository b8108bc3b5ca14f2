"""The README's commands print repnet's own lines only: no third-party warning, no library log, no native
(C / C++) log line reaches the terminal.

Each command runs in a fresh interpreter whose ``sys.stdout`` / ``sys.stderr`` record every text written from
repnet's own code (the frame that calls ``write`` belongs to a ``repnet`` module, or to argparse for usage).
Everything that reaches the process's file descriptors 1 and 2 is then compared with that record, line by
line: a line repnet did not write - a ``warnings`` message, a ``logging`` record, a tqdm bar, a line a C++
library wrote to fd 2 directly - fails the test. Small variants of the README's commands (32 px, a step or
two, tiny subsets); progress bars off with ``--quiet``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RUNNER = r'''
import json, os, sys
record, argv, pre = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ours = []

class Recorder:
    """A text stream that keeps what repnet's own code writes through it."""
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller == "repnet" or caller.startswith("repnet.") or caller == "argparse":
            ours.append(text)
        return self.stream.write(text)
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stdout, sys.stderr = Recorder(sys.stdout), Recorder(sys.stderr)
code = 1
try:
    exec(pre)
    from repnet.cli import main
    code = main(argv)
finally:
    sys.stdout.flush(); sys.stderr.flush()
    with open(record, "w") as f:
        f.write("".join(ours))
sys.exit(code)
'''


def foreign_lines(argv, tmp_path, pre="", timeout=600):
    """(exit code, the lines on fd 1 / fd 2 that repnet's code did not write, repnet's lines)."""
    record = tmp_path / f"record-{len(list(tmp_path.glob('record-*')))}.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "REPNET_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", RUNNER, str(record), json.dumps(argv), pre], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=timeout)
    ours = set(record.read_text().splitlines()) if record.is_file() else set()
    shown = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return out.returncode, [line for line in shown if line not in ours], shown


def test_the_check_sees_third_party_and_native_lines(tmp_path):
    """The recorder cannot pass noise: a warnings message, a logging record and a write to fd 2 are caught,
    while repnet's own lines (and its one-line errors) are not."""
    pre = ("import warnings, logging, os\n"
           "warnings.warn('a third-party warning')\n"
           "logging.getLogger('somelib').warning('a library log record')\n"
           "os.write(2, b'[native.cpp:71] a native log line\\n')\n")
    code, foreign, shown = foreign_lines(["list"], tmp_path, pre=pre)
    assert code == 0 and any(line.startswith("backbones:") for line in shown)
    assert any("a third-party warning" in line for line in foreign)
    assert any("a library log record" in line for line in foreign)
    assert "[native.cpp:71] a native log line" in foreign
    assert not any(line.startswith(("backbones:", "methods:")) for line in foreign)
    code, foreign, shown = foreign_lines(["train", "--method", "nope"], tmp_path)
    assert code == 2 and foreign == [] and shown[0].startswith("error: unknown method 'nope'")


def _check(argv, tmp_path, code=0, timeout=600):
    got, foreign, shown = foreign_lines(argv, tmp_path, timeout=timeout)
    assert foreign == [], f"{argv[0]}: lines not from repnet: {foreign[:5]}"
    assert got == code, shown[-5:]
    return shown


TRAIN = ["train", "--dataset", "fashion_mnist", "--method", "repnet", "--image-size", "32", "--epochs", "1",
         "--max-steps", "1", "--train-subset", "64", "--test-subset", "32", "--workers", "0", "--quiet"]


def test_readme_commands_print_only_repnet_lines(tmp_path):
    from tests.helpers import evil_torch

    _check(["list", "-v"], tmp_path)
    _check(["list"], tmp_path)  # (from the cache)
    shown = _check(["profile", "--backbone", "proxylessnas_mobile", "--method", "repnet,last", "--image-size", "32",
                    "--batch-size", "2", "--num-classes", "10", "--json", "p.json", "--plot", "p.png"], tmp_path)
    assert any(line.startswith("wrote p.png") for line in shown)
    _check([*TRAIN, "--out", "runs/r"], tmp_path)
    assert (tmp_path / "runs" / "r" / "results.json").is_file()
    _check(["train", "--resume", "runs/nowhere", "--quiet"], tmp_path, code=2)  # one line
    for out in ("model.pt2", "model.onnx"):
        shown = _check(["export", "--run", "runs/r", "--out", out], tmp_path)
        assert shown[-1].startswith(f"wrote {out}")
    _check(["plan", "--budget", "12MB", "--method", "bias,last", "--image-sizes", "32", "--top", "3", "--quiet",
            "--backbone", "mobilenet_v2", "--dataset", "digits"], tmp_path)
    _check(["continual", "--tasks", "digits,mnist5k", "--method", "last", "--image-size", "32", "--epochs", "1",
            "--train-subset", "64", "--test-subset", "32", "--workers", "0", "--quiet", "--out", "runs/cl"], tmp_path)
    _check(["federated", "--flower-app", "fl_app", "--dataset", "digits", "--clients", "2", "--rounds", "3",
            "--out", "/srv/fl/run1"], tmp_path)
    _check(["reproduce", "table3", "--dry-run"], tmp_path)
    evil_torch(tmp_path / "evil.pth", tmp_path / "marker")  # a refused pickle: our one line, not torch's advice
    shown = _check([*TRAIN, "--weights", str(tmp_path / "evil.pth"), "--out", "runs/e"], tmp_path, code=2)
    assert len(shown) == 1 and "weights_only" not in shown[0] and not (tmp_path / "marker").exists()


@pytest.mark.slow
def test_readme_runtime_and_federated_commands_print_only_repnet_lines(tmp_path):
    pytest.importorskip("executorch")
    _check(["train", "--runtime", "executorch", "--dataset", "digits", "--image-size", "32", "--epochs", "1",
            "--max-steps", "2", "--workers", "0", "--quiet", "--out", "runs/et"], tmp_path)
    shown = _check(["export", "--training", "--run", "runs/et", "--out", "repnet.pte"], tmp_path)
    assert shown[-1].startswith("wrote repnet.pte")
    _check(["profile", "--backbone", "mobilenet_v2", "--method", "bias,last", "--runtime", "executorch", "--no-peak",
            "--image-size", "32", "--batch-size", "2"], tmp_path)
    _check(["federated", "--dataset", "digits", "--clients", "2", "--rounds", "1", "--set", "image_size=32",
            "--set", "train_subset=64", "--set", "test_subset=32", "--set", "workers=0", "--quiet",
            "--out", "runs/fl"], tmp_path)


def test_readme_proviot_commands_print_only_repnet_lines(tmp_path):
    from tests.proviot.test_proviot_textpaths import benign_lines

    (tmp_path / "benign.txt").write_text("\n".join(benign_lines()) + "\n")
    (tmp_path / "odd.txt").write_text("/usr/bin/python3 WRITE /memfd:x FILE_EXEC /memfd:x\n")
    shown = _check(["proviot", "train", "--paths", "benign.txt", "--out", "runs/detector", "--epochs", "20"], tmp_path)
    assert shown[-1].startswith("wrote runs/detector")
    _check(["proviot", "detect", "--model", "runs/detector", "--paths", "odd.txt", "--json", "d.json"], tmp_path)
    assert (tmp_path / "d.json").is_file()


@pytest.mark.slow
def test_readme_device_trainer_command_prints_only_repnet_lines(tmp_path):
    """`repnet train --runtime device`: the C++ process's own lines are relayed by repnet, nothing else."""
    pytest.importorskip("executorch")
    if not (ROOT / "build" / "device" / "repnet-device").is_file():
        pytest.skip("the device trainer is not built (bash scripts/setup.sh)")
    _check(["train", "--runtime", "device", "--dataset", "digits", "--image-size", "32", "--epochs", "1",
            "--max-steps", "2", "--workers", "0", "--quiet", "--out", "runs/dev"], tmp_path)
    assert (tmp_path / "runs" / "dev" / "results.json").is_file()
