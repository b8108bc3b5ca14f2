"""collect -> train -> detect on real traced commands (strace): an emulated fileless execution
(memfd_create + exec of the in-memory file) is flagged, the held-out benign runs are not; the
model folder is reread by the torch-free monitor's loader; bad input is one line, exit 2."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from repnet.cli import main
from repnet.proviot.workloads import ATTACKS, BENIGN_JOBS, DEVICE_PATH, prepare_root

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
JOBS = ["app_log", "cron_health", "config_check", "sensor_json", "sensor_store", "backup"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 traced runs of each of 6 benign jobs (3 to train on, 1 held out) and one fileless run."""
    base = tmp_path_factory.mktemp("proviot-runs")
    root = base / "root"
    prepare_root(root, "tiny")
    env = {"ROOT": str(root), "PATH": DEVICE_PATH, "PYTHONPATH": None, "PYTHONDONTWRITEBYTECODE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():  # the traced jobs run as on a device: system tools, no venv
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    files = {"train": [], "held": []}
    try:
        for rep in range(4):
            for job in JOBS:
                out = base / f"{job}-{rep}.json"
                assert main(["proviot", "collect", "--out", str(out), "--alias", f"{root}=$ROOT", "--", "sh", "-c",
                             BENIGN_JOBS[job]]) == 0
                files["train" if rep < 3 else "held"].append(str(out))
        files["fileless"] = str(base / "fileless.json")
        assert main(["proviot", "collect", "--out", files["fileless"], "--label", "fileless", "--alias",
                     f"{root}=$ROOT", "--", "sh", "-c", ATTACKS["fileless"]]) == 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    files["base"] = base
    return files


def test_fileless_trace_has_the_memfd_exec(runs):
    from repnet.proviot.collect import load_trace

    t = load_trace(runs["fileless"])
    labels = {(t.nodes[s][2], e, t.nodes[d][2]) for _, s, e, d in t.events}
    assert any(e == "WRITE" and d.startswith("/memfd:kworker") for _, e, d in labels), labels
    assert any(e == "FILE_EXEC" and s.startswith("/memfd:kworker") for s, e, _ in labels)
    assert t.meta["label"] == "fileless" and t.collector == "strace"


def test_collect_train_detect_flags_fileless_only(runs, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["proviot", "train", *sum((["--trace", f] for f in runs["train"]), []), "--out", str(model),
                 "--epochs", "100", "--batch-size", "8"]) == 0
    out = tmp_path / "res.json"
    assert main(["proviot", "detect", "--model", str(model), *sum((["--trace", f] for f in runs["held"]), []),
                 "--trace", runs["fileless"], "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    flagged = {(w["label"], w["flagged"]) for w in res["windows"]}
    fileless = [w for w in res["windows"] if w["label"] == "fileless"]
    assert fileless and fileless[0]["flagged"], res["windows"]
    assert "/memfd:kworker" in fileless[0]["alert"] or fileless[0]["score"] > res["window_threshold"]
    assert ("benign", True) not in flagged, [w for w in res["windows"] if w["flagged"]]
    ev = res["evaluation"]
    assert ev["overall"]["f1"] == 1.0 and ev["missed_classes"] == []
    assert "ALERT" in capsys.readouterr().out


def test_numpy_loader_matches_torch_model(runs, tmp_path):
    from repnet.proviot.collect import load_trace
    from repnet.proviot.detector import load_model, load_numpy_detector
    from repnet.proviot.graph import window_graphs

    model = tmp_path / "model"
    assert main(["proviot", "train", *sum((["--trace", f] for f in runs["train"]), []), "--out", str(model),
                 "--epochs", "5"]) == 0
    a, b = load_model(model), load_numpy_detector(model)
    g = window_graphs(load_trace(runs["fileless"]))[0]
    ra, rb = a.score(g), b.score(g)
    assert ra["alert"] == rb["alert"] and ra["score"] == pytest.approx(rb["score"], rel=1e-5)
    assert a.window_threshold == b.window_threshold
    # a flipped byte in the weights is refused by both loaders
    f = model / "detector.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    from repnet import RepnetError

    for loader in (load_model, load_numpy_detector):
        with pytest.raises(RepnetError, match="damaged"):
            loader(model)


def test_monitor_imports_no_torch(runs, tmp_path):
    """The steady-state monitor's process: numpy + the parser + the detector, never torch."""
    import subprocess

    model = tmp_path / "model"
    assert main(["proviot", "train", *sum((["--trace", f] for f in runs["train"]), []), "--out", str(model),
                 "--epochs", "3"]) == 0
    raw = tmp_path / "strace.txt"
    raw.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-m", "repnet.proviot.monitor", str(model), str(raw), "--duration", "0.5",
                        "--interval", "0.2", "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.split("PROVIOT_MONITOR ", 1)[1])
    assert res["torch_imported"] is False and res["peak_rss_mb"] > 0


@pytest.mark.parametrize("case", ["not_a_trace", "json_not_trace", "damaged", "empty_benign", "no_edge_types",
                                  "missing_model", "no_command"])
def test_bad_input_is_one_line(runs, tmp_path, capsys, case):
    args = None
    if case == "not_a_trace":
        (tmp_path / "t.json").write_text("this is not a trace\n")
        args, msg = ["train", "--trace", str(tmp_path / "t.json"), "--out", str(tmp_path / "m")], "is not a trace"
    elif case == "json_not_trace":
        (tmp_path / "t.json").write_text('{"a": 1}')
        args, msg = ["detect", "--model", str(tmp_path), "--trace", str(tmp_path / "t.json")], "not a proviot model"
    elif case == "damaged":
        doc = json.loads(Path(runs["train"][0]).read_text())
        doc["events"] = doc["events"][1:]
        (tmp_path / "t.json").write_text(json.dumps(doc))
        args, msg = ["train", "--trace", str(tmp_path / "t.json"), "--out", str(tmp_path / "m")], "is damaged"
    elif case == "empty_benign":
        args, msg = ["train", "--trace", runs["fileless"], "--out", str(tmp_path / "m")], "benign set is empty"
    elif case == "no_edge_types":
        (tmp_path / "p.txt").write_text("/bin/a /bin/b /bin/c\n")
        args, msg = ["train", "--paths", str(tmp_path / "p.txt"), "--out", str(tmp_path / "m")], "has no edge types"
    elif case == "missing_model":
        args, msg = ["detect", "--model", str(tmp_path / "nope"), "--trace", runs["fileless"]], "not a proviot model"
    elif case == "no_command":
        args, msg = ["collect", "--out", str(tmp_path / "x.json")], "give a command"
    assert main(["proviot", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err, err
    assert not (tmp_path / "m" / "detector.safetensors").exists()
