"""Causal paths given as text: the importer round-trips, refuses what is not a path file, and a
detector trained on a benign file flags the anomaly file's paths."""
import pytest

from repnet import RepnetError
from repnet.cli import main
from repnet.proviot.paths import Path
from repnet.proviot.textpaths import read_paths, score_text_paths, train_text_detector, write_paths

EXAMPLE = "/bin/dash PROC_CREATE /usr/bin/app READ_WRITE /var/lib/app.db"


def test_round_trip(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(f"# a comment\n{EXAMPLE}\n\n  /usr/sbin/sshd   SOCK_ESTABLISHED tcp:10.0.0.1:22  \n")
    paths = read_paths(f)
    assert paths == [Path(("/bin/dash", "/usr/bin/app", "/var/lib/app.db"), ("PROC_CREATE", "READ_WRITE")),
                     Path(("/usr/sbin/sshd", "tcp:10.0.0.1:22"), ("SOCK_ESTABLISHED",))]
    assert paths[0].text() == EXAMPLE
    write_paths(paths, tmp_path / "q.txt")
    assert (tmp_path / "q.txt").read_text() == f"{EXAMPLE}\n/usr/sbin/sshd SOCK_ESTABLISHED tcp:10.0.0.1:22\n"
    assert read_paths(tmp_path / "q.txt") == paths


@pytest.mark.parametrize("text, msg", [
    ("/bin/a /bin/b /bin/c\n", "has no edge types"),
    ("", "holds no paths"),
    ("# only a comment\n", "holds no paths"),
    (f"{EXAMPLE}\n/bin/a READ\n", "line 2: a path is node EDGE_TYPE node"),
    (f"{EXAMPLE}\n/bin/a /bin/b /bin/c\n", "line 2: '/bin/b' stands where an edge type"),
])
def test_bad_path_files(tmp_path, text, msg):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(RepnetError, match=msg):
        read_paths(f)


def test_write_refuses_unwritable_labels(tmp_path):
    with pytest.raises(RepnetError, match="whitespace"):
        write_paths([Path(("/a b", "/c"), ("READ",))], tmp_path / "x.txt")


def benign_lines(n=60):
    tools = ["cat", "grep", "sort", "gzip", "tar", "date"]
    out = []
    for i in range(n):
        t = tools[i % len(tools)]
        out.append(f"/usr/bin/sh PROC_CREATE /usr/bin/{t} READ /etc/app/conf{i % 3} WRITE /var/log/app.log")
    return out


def test_text_detector_flags_anomalies_not_benign(tmp_path):
    from repnet.proviot.detector import DetectorSettings

    b = tmp_path / "benign.txt"
    b.write_text("\n".join(benign_lines()) + "\n")
    s = DetectorSettings(epochs=80, path_quantile=1.0, seed=0)
    det, info = train_text_detector(read_paths(b), s)
    assert info["train_paths"] + info["val_paths"] == 60
    anomalies = [Path(("/usr/bin/python3", "/memfd:x", "/memfd:x"), ("WRITE", "FILE_EXEC")),
                 Path(("/usr/bin/curl", "tcp:127.0.0.1:4444", "/usr/bin/bash"), ("CONNECT", "RECV"))]
    rows = score_text_paths(det, anomalies)
    assert all(r["anomalous"] for r in rows), rows
    fresh = read_paths(b)[:12]
    assert not any(r["anomalous"] for r in score_text_paths(det, fresh))
    # the regularity of an unseen path is the floor eps**3 per edge, of a seen one far higher
    assert rows[0]["log_regularity"] < score_text_paths(det, fresh)[0]["log_regularity"]


def test_cli_paths_round(tmp_path, capsys):
    b = tmp_path / "benign.txt"
    b.write_text("\n".join(benign_lines()) + "\n")
    a = tmp_path / "anomaly.txt"
    a.write_text("/usr/bin/python3 WRITE /memfd:x FILE_EXEC /memfd:x\n")
    assert main(["proviot", "train", "--paths", str(b), "--out", str(tmp_path / "m"), "--epochs", "60",
                 "--path-quantile", "1.0"]) == 0
    assert main(["proviot", "detect", "--model", str(tmp_path / "m"), "--paths", str(a)]) == 0
    out = capsys.readouterr().out
    assert "ALERT" in out and "1/1 paths anomalous" in out


def test_doc2vec_model_folder_round_trips_without_pickle(tmp_path):
    pytest.importorskip("gensim")
    from repnet.proviot.detector import DetectorSettings, load_model, save_model

    b = tmp_path / "benign.txt"
    b.write_text("\n".join(benign_lines()) + "\n")
    det, info = train_text_detector(read_paths(b), DetectorSettings(embedding="doc2vec", epochs=5))
    save_model(det, tmp_path / "m", info)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "detector.safetensors", "doc2vec.safetensors", "embedder.json", "freqdb.json", "model.json", "repnet-run.json"]
    back = load_model(tmp_path / "m")
    paths = read_paths(b)[:5] + [Path(("/usr/bin/python3", "/memfd:x"), ("WRITE",))]
    assert (back.embedder.transform([p.words() for p in paths]) == det.embedder.transform([p.words() for p in paths])).all()


# ----------------------------------------------------------------------------- bad model files and settings
def _model(tmp_path):
    b = tmp_path / "benign.txt"
    b.write_text("\n".join(benign_lines()) + "\n")
    assert main(["proviot", "train", "--paths", str(b), "--out", str(tmp_path / "m"), "--epochs", "5"]) == 0
    return b


DEEP = "[" * 100_000 + "]" * 100_000
BAD_FILES = [("freqdb.json", "garbage"), ("freqdb.json", '{"a": 1}'), ("freqdb.json", DEEP),
             ("embedder.json", "xx"), ("embedder.json", "[1, 2]"), ("embedder.json", DEEP),
             ("embedder.json", '{"kind": "hash", "dim": 10000000000}'), ("embedder.json", '{"kind": "hash"}'),
             ("detector.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")]


@pytest.mark.parametrize("name,content", BAD_FILES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_FILES)])
def test_a_damaged_model_file_is_one_line(tmp_path, capsys, name, content):
    import shutil

    b = _model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "m", bad)
    (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    capsys.readouterr()
    assert main(["proviot", "detect", "--model", str(bad), "--paths", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag,value", [("--lr", "1e38"), ("--lr", "nan"), ("--k", "0"), ("--k", "1000000000"),
                                        ("--epochs", "1000000000"), ("--margin", "nan"), ("--path-quantile", "2")])
def test_settings_out_of_range_are_one_line_and_leave_no_folder(tmp_path, capsys, flag, value):
    b = tmp_path / "benign.txt"
    b.write_text("\n".join(benign_lines()) + "\n")
    assert main(["proviot", "train", "--paths", str(b), "--out", str(tmp_path / "m"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and not (tmp_path / "m").exists(), err


def test_a_trace_nested_too_deeply_is_one_line(tmp_path, capsys):
    _model(tmp_path)
    (tmp_path / "deep.json").write_text(DEEP)
    capsys.readouterr()
    assert main(["proviot", "detect", "--model", str(tmp_path / "m"), "--trace", str(tmp_path / "deep.json")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


def test_training_that_fails_leaves_no_model_folder(tmp_path, capsys):
    """The model folder is claimed before training (a foreign folder is refused before the work) and released
    when training fails, so the same command works once the input is fixed."""
    (tmp_path / "p.txt").write_text("/usr/bin/sh\n")  # a path with no edge
    assert main(["proviot", "train", "--paths", str(tmp_path / "p.txt"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert main(["proviot", "train", "--paths", str(tmp_path / "p.txt"), "--out", str(tmp_path / "theirs")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "theirs" / "notes.txt").read_text() == "mine"
