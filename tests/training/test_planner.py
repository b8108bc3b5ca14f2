"""``repnet plan``: configurations whose measured peak fits a budget, each re-measured here from
its printed ``repnet train`` command; a budget nothing fits is one line; budgets parse; the
expectations it ranks by are the committed benchmark results' (regenerated and compared).

The bar command (ProxylessNAS -> Flowers-102 in 40 MB, its default search) runs once, in-process
through the CLI entry point (about 1.5 minutes on one CPU thread); the other searches are
restricted to small spaces.
"""
import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from repnet import RepnetError
from repnet.cli import build_parser, main
from repnet.commands.flags import overrides_from
from repnet.config.build import build_model
from repnet.config.recipes import make_config
from repnet.training.planner import (EXPECTATIONS, describe, expected_accuracy, load_expectations, measure_peak_mb,
                                     parse_budget, plan)

ROOT = Path(__file__).resolve().parents[2]
BAR = ["plan", "--budget", "40MB", "--backbone", "proxylessnas_mobile", "--dataset", "flowers102", "--json"]


def _config_of(command: str):
    """The TrainConfig ``repnet train`` makes of a printed command (the real parser)."""
    parts = shlex.split(command)
    assert parts[:2] == ["repnet", "train"], command
    args = build_parser().parse_args(parts[1:])
    assert args.func.__module__ == "repnet.commands.train"
    return make_config(overrides_from(args))


@pytest.fixture(scope="module")
def bar(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*BAR, str(out)])
    assert code == 0
    return json.loads(out.read_text()), printed.getvalue()


@pytest.mark.slow
def test_the_bar_command_lists_configurations_whose_remeasured_peak_fits(bar):
    doc, _ = bar
    confs = doc["configurations"]
    assert doc["budget_mb"] == 40.0 and doc["backbone"] == "proxylessnas_mobile" and doc["dataset"] == "flowers102"
    assert doc["num_classes"] == 102 and doc["effective_batch"] == 8 and len(confs) >= 3
    for c in confs:
        assert c["peak_mb"] <= 40 and c["micro_batch"] * c["accum_steps"] == 8
        cfg = _config_of(c["command"])  # rebuilt from the command alone, measured again
        assert (cfg.method, cfg.image_size, cfg.batch_size, cfg.accum_steps, cfg.dataset, cfg.backbone) == (
            c["method"], c["image_size"], c["micro_batch"], c["accum_steps"], "flowers102", "proxylessnas_mobile")
        assert (cfg.frozen_bits, cfg.int8) == {"fp32": ("none", False), "int8-frozen": ("linear", False),
                                               "int8-side": ("none", True)}[c["precision"]]
        assert cfg.options == c["options"]
        model = build_model(cfg, doc["num_classes"], pretrained=False)
        peak = measure_peak_mb(model, cfg.batch_size, cfg.image_size)
        assert peak <= 40, c["command"]
        assert peak == pytest.approx(c["peak_mb"], rel=0.01), c["command"]


@pytest.mark.slow
def test_the_bar_plan_is_ranked_and_says_where_the_expectation_comes_from(bar):
    doc, printed = bar
    confs = doc["configurations"]
    accs = [c["expected_accuracy"] for c in confs]
    assert None not in accs and accs == sorted(accs, reverse=True)
    combos = [(c["method"], c["placement"], c["precision"]) for c in confs]
    assert len(set(combos)) == len(combos)  # one row per method x placement x precision
    for c in confs:
        assert c["expected_from"].startswith(f"{c['method']} ") and "accuracy_224_" in c["expected_from"]
        assert c["analytic_mb"] > 0
    src = doc["expectation_source"]
    assert src["generated_by"] == "python benchmarks/expected_accuracy.py"
    assert "accuracy_224_fashion_mnist.json" in src["benchmark_files"]
    assert all((ROOT / "benchmarks" / "results" / f).is_file() for f in src["benchmark_files"])
    log = {r["configuration"]: r["peak_mb"] for r in doc["measurements"]}  # every measurement is reported
    for c in confs:
        label = describe(c["method"], c["options"], c["precision"], c["image_size"], c["micro_batch"],
                         c["accum_steps"])
        assert log[label] == c["peak_mb"], label
    # the table, where the expectation comes from, and one command per row, as in the JSON
    assert "peak MB" in printed and "analytic MB" in printed and "expected acc" in printed
    assert "expected acc: from committed benchmark results" in printed
    commands = re.findall(r"^\d+: (repnet train .*)$", printed, re.M)
    assert commands == [c["command"] for c in confs]


def test_a_budget_nothing_fits_is_one_line_naming_the_smallest_configuration(capsys):
    code = main(["plan", "--budget", "1MB", "--backbone", "proxylessnas_mobile", "--dataset", "flowers102"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    m = re.fullmatch(r"error: nothing fits in 1\.0 MB: the smallest measured configuration is (\S+) (\S+) "
                     r"(\d+) px batch (\d+) \(x(\d+)\) at ([\d.]+) MB", err)
    assert m, err
    method, precision, size, micro, accum, mb = m.groups()
    assert (int(size), int(micro), int(accum)) == (128, 1, 8) and float(mb) > 1


def test_a_restricted_search_lists_the_largest_micro_batch_that_fits():
    """bias / last at 96-128 px in 12 MB: each row is the largest fitting micro-batch (twice it
    is measured over the budget), and every row's command parses with the train parser."""
    doc = plan(12.0, "proxylessnas_mobile", "flowers102", methods=["bias", "last"], image_sizes=[128, 96],
               precisions=["fp32", "int8-frozen", "int8-side"], top=3, progress=False)
    confs = doc["configurations"]
    assert 1 <= len(confs) <= 3 and all(c["precision"] != "int8-side" for c in confs)  # no side network
    for c in confs:
        cfg = _config_of(c["command"])
        assert c["peak_mb"] <= 12 and cfg.batch_size == c["micro_batch"]
        if c["micro_batch"] < 8:
            model = build_model(make_config({**c["overrides"], "batch_size": 2 * c["micro_batch"]}), 102,
                                pretrained=False)
            assert measure_peak_mb(model, 2 * c["micro_batch"], c["image_size"]) > 12


@pytest.mark.parametrize("text,mb", [("40MB", 40.0), ("40 MB", 40.0), ("1.5GB", 1500.0), ("512KB", 0.512),
                                     ("40", 40.0), ("0.5mb", 0.5), ("2000000B", 2.0)])
def test_budgets_parse_in_mb_of_1e6_bytes(text, mb):
    assert parse_budget(text) == pytest.approx(mb)


@pytest.mark.parametrize("args,message", [
    (["--budget", "lots"], "--budget 'lots': expected a size such as 40MB"),
    (["--budget", "0"], "--budget must be more than 0"),
    (["--budget", "40TB"], "--budget '40TB'"),
    (["--budget", "40MB", "--dataset", "nope"], "unknown dataset 'nope'; choose from:"),
    (["--budget", "40MB", "--backbone", "nope"], "unknown backbone 'nope'; choose from:"),
    (["--budget", "40MB", "--method", "repnet,nope"], "unknown method 'nope'; choose from:"),
    (["--budget", "40MB", "--precisions", "fp16"], "unknown precision 'fp16'; choose from: fp32, int8-frozen"),
    (["--budget", "40MB", "--image-sizes", "224,big"], "--image-sizes expects whole numbers"),
    (["--budget", "40MB", "--image-sizes", "16"], "image sizes must be >= 32"),
    (["--budget", "40MB", "--top", "0"], "--top must be >= 1"),
    (["--budget", "40MB", "--dataset", "imagefolder:/x"], "give --num-classes"),
])
def test_bad_input_is_one_line(capsys, args, message):
    code = main(["plan", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_expected_accuracy_follows_the_committed_summary():
    t = load_expectations()
    acc, source = expected_accuracy("repnet", {}, "fp32", 224, t)
    assert acc == t["methods"]["repnet"]["accuracy"] and "accuracy_224_mnist5k.json" in source
    off = t["resolution"]["offsets"]
    acc192, _ = expected_accuracy("repnet", {}, "fp32", 192, t)  # halfway between 160 and 224 px
    assert acc192 == pytest.approx(acc + (off["160"] + off["224"]) / 2)
    acc_all, source = expected_accuracy("repnet", {"placement": "all"}, "int8-side", 224, t)
    assert acc_all == pytest.approx(acc + t["options"]["repnet"]["placement=all"]["offset"]
                                    + t["precision"]["int8-side"]["offset"])
    assert "int8_cpu.json" in source and "accuracy_224_mnist5k_ablations.json" in source
    assert expected_accuracy("da3", {}, "fp32", 224, t)[0] is None


def test_the_committed_summary_is_what_the_benchmark_results_give():
    """src/repnet/training/expected_accuracy.json is regenerated from benchmarks/results: not stale, not typed in."""
    spec = importlib.util.spec_from_file_location("expected_accuracy", ROOT / "benchmarks" / "expected_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.summarize() == json.loads(EXPECTATIONS.read_text())


def test_plan_refuses_a_bad_budget_as_a_library_call():
    with pytest.raises(RepnetError, match="more than 0 MB"):
        plan(0.0, "proxylessnas_mobile", "flowers102")
