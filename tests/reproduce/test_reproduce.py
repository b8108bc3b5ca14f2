"""The reproduction harness: table plans carry the paper's numbers, runs train / resume / skip,
a missing dataset costs one line (not the other runs), and the summary reads the run results."""
import json
import os

import pytest
from PIL import Image

from repnet.cli import main
from repnet.reproduce.tables import TABLES, select
from repnet.reproduce.runner import collect, plan, run_one, run_table, train_command

QUICK = dict(random_init=True, image_size=32, epochs=1, steps_per_epoch=2, workers=0, progress=False,
             profile_memory=False, memory="vanilla")


def _tinytl_layout(root, classes=("a", "b"), n_train=10, n_val=4):
    """``root/train/<class>/*.jpg`` + ``root/val/<class>/*.jpg`` (TinyTL's layout), solid colours."""
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(classes):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                colour = (200 * ci + i, 40 + 100 * ci, 120 - 50 * ci)
                Image.new("RGB", (12, 12), colour).save(root / split / c / f"{i}.jpg")


def test_tables_carry_the_papers_numbers():
    t3 = TABLES["table3"].cells
    assert len(t3) == 8 * 4
    cell = {(c.dataset, c.method, c.image_size): c for c in t3}
    assert cell["flowers102", "repnet", 224].accuracy == 96.1
    assert cell["aircraft", "tinytl_lb", 320].accuracy == 82.3
    assert cell["cifar100", "repnet", 320].memory_mb == 61.0
    t1 = {(c.row, c.dataset): c for c in TABLES["table1"].cells}
    assert t1["none", "cars"].accuracy == 51.1 and dict(t1["none", "cars"].options) == {"connector": "none"}
    assert dict(t1["dual, every block", "aircraft"].options)["placement"] == "all"
    t2 = {(c.row, c.dataset): c for c in TABLES["table2"].cells}
    assert t2["Rep-Net / ResNet-50", "aircraft"].accuracy == 85.9
    assert t2["Adv. Rep / MobileNetV3", "cifar10"].accuracy == 59.4
    assert all(c.accuracy is not None for t in TABLES.values() for c in t.cells)


def test_plan_is_one_run_per_configuration_with_recipe_defaults(tmp_path):
    runs = plan("table3", tmp_path, data_dir="/data", weights={"proxylessnas_mobile": "/w.pth"},
                datasets="cars", image_sizes="320")
    assert [r.key for r in runs] == ["cars-proxylessnas_mobile-tinytl_lb-320", "cars-proxylessnas_mobile-repnet-320"]
    ov = runs[1].overrides
    assert ov["data_root"] == "/data/cars" and ov["weights"] == "/w.pth" and ov["batch_size"] == 8
    assert "lr" not in ov  # the dataset's recipe decides (docs/recipes.md)
    cmd = train_command(runs[1])
    assert "--method repnet" in cmd and "--image-size 320" in cmd and "--data-root /data/cars" in cmd
    runs = plan("table1", tmp_path, datasets="pets", settings={"epochs": 2, "options": {"train_bias": False}})
    assert len(runs) == 5 and len({r.key for r in runs}) == 5
    assert runs[0].overrides["options"] == {"connector": "none", "train_bias": False}
    assert all(r.overrides["epochs"] == 2 for r in runs)


def test_filters_reject_what_the_table_does_not_have():
    from repnet import RepnetError

    with pytest.raises(RepnetError, match="dataset mnist not in this table"):
        select("table3", datasets="mnist")
    with pytest.raises(RepnetError, match="unknown table"):
        select("table7")


def test_runs_train_skip_resume_and_a_missing_dataset_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    _tinytl_layout(data / "pets")
    root = tmp_path / "runs"
    filters = dict(datasets="pets,cars", methods="repnet", image_sizes="224")
    statuses = run_table("table3", root, data_dir=data, settings=QUICK, **filters)
    by_key = {s["key"]: s for s in statuses}
    assert by_key["pets-proxylessnas_mobile-repnet-224"]["status"] == "trained"
    missing = by_key["cars-proxylessnas_mobile-repnet-224"]
    assert missing["status"] == "error" and "\n" not in missing["message"] and "cars" in missing["message"]

    run_dir = root / "table3" / "pets-proxylessnas_mobile-repnet-224"
    results = json.loads((run_dir / "results.json").read_text())
    summary = json.loads((root / "table3" / "summary.json").read_text())
    row = {r["run"]: r for r in summary["rows"]}["pets-proxylessnas_mobile-repnet-224"]
    assert row["published_accuracy"] == 91.8
    assert row["accuracy"] == pytest.approx(100 * results["test_accuracy"])
    assert row["accuracy_delta"] == pytest.approx(round(100 * results["test_accuracy"] - 91.8, 2))
    assert row["settings"]["image_size"] == 32  # the quick settings are recorded with the figure
    assert summary["finished"] == 1 and summary["cells"] == 2
    assert "| Rep-Net @224 | pets | 91.8 |" in (root / "table3" / "summary.md").read_text()

    # finished -> skipped without touching it
    stamp = os.stat(run_dir / "results.json").st_mtime_ns
    run = plan("table3", root, data_dir=data, settings=QUICK, datasets="pets", methods="repnet", image_sizes="224")[0]
    assert run_one(run) == ("done", "finished earlier")
    assert os.stat(run_dir / "results.json").st_mtime_ns == stamp

    # interrupted (checkpoint, no results) -> resumed to the same result, unless the settings changed
    os.remove(run_dir / "results.json")
    changed = plan("table3", root, data_dir=data, settings={**QUICK, "epochs": 2}, datasets="pets", methods="repnet",
                   image_sizes="224")[0]
    status, msg = run_one(changed)
    assert status == "error" and "other settings (epochs)" in msg and "\n" not in msg
    status, _ = run_one(run)
    assert status == "resumed"
    again = json.loads((run_dir / "results.json").read_text())
    assert again["test_accuracy"] == results["test_accuracy"] and again["steps"] == results["steps"]


def test_cli_dry_run_and_collect(tmp_path, capsys):
    assert main(["reproduce", "table2", "--dry-run", "--backbones", "mobilenet_v2", "--datasets", "cifar10",
                 "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all(line.startswith("repnet train --dataset cifar10 --backbone mobilenet_v2") for line in out)
    assert main(["reproduce", "table1", "--collect", "--datasets", "cub200", "--root", str(tmp_path)]) == 0
    summary = collect("table1", tmp_path, write=False, datasets="cub200")
    assert summary["finished"] == 0 and summary["cells"] == 5
    assert main(["reproduce", "table3", "--set", "method=full", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --set method")
