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


def test_demo_tune_tunes_every_compared_method_on_validation(tmp_path):
    """`repnet demo --tune`: each compared method's run chooses its rate (its own key) from trials on the
    validation split, and the row trains with the winner; without it, the demo's committed rates."""
    from repnet.demo.config import DEMO_LRS, DemoConfig, method_config
    from repnet.training.tune import GRIDS

    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), methods=("repnet", "last"), image_size=32, train_subset=96,
                     test_subset=32, epochs=1, batch_size=16, memory="vanilla", profile_memory=False,
                     progress=False, tune=True)
    assert method_config(cfg, "repnet").tune is True
    assert method_config(DemoConfig(), "repnet").tune is False and method_config(DemoConfig(), "repnet").lr_side == \
        DEMO_LRS["repnet"][1]
    assert main(["demo", "--tune", "--method", "repnet,last", "--image-size", "32", "--train-subset", "96",
                 "--test-subset", "32", "--epochs", "1", "--batch-size", "16", "--memory", "vanilla", "--no-profile",
                 "--quiet", "--out", str(tmp_path / "demo")]) == 0
    for spec, key in (("repnet", "lr_side"), ("last", "lr")):
        res = json.loads((tmp_path / "demo" / "runs" / spec / "results.json").read_text())
        assert res["tune"]["key"] == key and [t["value"] for t in res["tune"]["trials"]] == list(GRIDS[key])
        assert res["config"][key] == res["tune"]["value"]
