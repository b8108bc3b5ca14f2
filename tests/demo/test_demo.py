"""repnet demo: end to end on a tiny budget, bad input in one line."""
import json
from repnet.cli import main


# ----------------------------------------------------------------------------- demo
def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from repnet.demo.config import DemoConfig
    from repnet.demo.run import run

    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), methods=("repnet", "last", "linear_probe"), image_size=32,
                     train_subset=64, test_subset=64, epochs=1, batch_size=16, memory="vanilla",
                     profile_memory=False, progress=False)
    res = run(cfg)
    assert [r["method"] for r in res["rows"]] == ["repnet", "last", "linear_probe"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in res["rows"])
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["rows"] == res["rows"] and "repnet vs last" in saved["verdict"][0]
    assert (tmp_path / "demo" / "memory_vs_accuracy.png").stat().st_size > 1000


def test_demo_unknown_method_is_one_line(capsys, tmp_path):
    assert main(["demo", "--method", "repnet,nope", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method 'nope'") and len(err.splitlines()) == 1
