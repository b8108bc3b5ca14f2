"""The accuracy expectations ``repnet plan`` ranks by, summarised from the committed benchmark results.

``repnet plan`` must rank configurations in an installed package too, where ``benchmarks/`` is
absent, so it reads this script's output, ``src/repnet/training/expected_accuracy.json``, not the
benchmark files. Every number in it is computed here from ``benchmarks/results/*.json`` (nothing
typed in), and ``tests/test_plan.py`` regenerates it and fails if the committed copy is stale.

The rules (each figure names its files in the output):

* **method**: the mean, over the datasets with a committed recipe run at 224 px
  (``accuracy_224_<dataset>.json``, ``..._full.json`` for ``full``), of the method's test
  accuracy (itself the mean over that file's seeds); ImageNet MobileNetV2, the dataset's recipe,
  1,000 training images, 2 epochs. No ProxylessNAS accuracy is committed, so these stand for
  every backbone: they rank methods, they do not promise a number on another backbone.
* **resolution**: the sweep (``accuracy_224_fashion_mnist_sweep.json``, seed 0 at 64 / 112 /
  160 px) against the same methods' 224 px recipe mean, averaged over the swept methods: an
  offset per resolution, 0 at 224 px. ``repnet.training.planner`` interpolates it linearly between
  these resolutions and holds the end values outside them.
* **precision**: ``int8-side`` = the ``int8`` row (the ``--int8`` defaults: stochastic error
  rounding, fp32 master weights) minus the ``fp32`` row of ``int8_cpu.json``; ``int8-frozen``
  (8-bit frozen weights without INT8 training) has no committed run of its own: offset 0.
* **options**: a method option's offset is the ablation row against the reference row of the
  same file, seeds and learning rate (``accuracy_224_mnist5k_ablations.json``:
  ``repnet@placement=all[lr_side=1e-3]`` against ``repnet[lr_side=1e-3]``, seed 0).

    python benchmarks/expected_accuracy.py          # rewrites src/repnet/training/expected_accuracy.json
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "src" / "repnet" / "training" / "expected_accuracy.json"
COMMAND = "python benchmarks/expected_accuracy.py"

BACKBONE = "mobilenet_v2"
#: the recipe runs at 224 px, one pair of files per dataset
RECIPE_FILES = {"fashion_mnist": ("accuracy_224_fashion_mnist.json", "accuracy_224_fashion_mnist_full.json"),
                "mnist5k": ("accuracy_224_mnist5k.json", "accuracy_224_mnist5k_full.json")}
SWEEP = ("accuracy_224_fashion_mnist_sweep.json", "fashion_mnist")
INT8 = ("int8_cpu.json", "int8", "fp32")
#: (method, option, value): (file, ablation row, reference row, seeds compared)
OPTIONS = {("repnet", "placement", "all"): ("accuracy_224_mnist5k_ablations.json",
                                            "repnet@placement=all[lr_side=1e-3]", "repnet[lr_side=1e-3]")}


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _r(x: float) -> float:
    return round(x, 5)


def _recipe_rows(name: str) -> dict[str, dict]:
    """Plain method rows (no ``@option``, no ``[--set]``) of one recipe file, MobileNetV2 at 224 px."""
    return {r["method"]: r for r in _load(name)["rows"]
            if r["backbone"] == BACKBONE and r["image_size"] == 224 and not r.get("extra")
            and "@" not in r["method"] and "[" not in r["method"]}


def summarize() -> dict:
    per: dict[str, dict] = {}
    for dataset, files in RECIPE_FILES.items():
        for name in files:
            for method, row in _recipe_rows(name).items():
                m = per.setdefault(method, {"per_dataset": {}, "seeds": {}, "files": []})
                m["per_dataset"][dataset] = _r(row["mean"])
                m["seeds"][dataset] = len(row["seeds"])
                m["files"].append(name)
    methods = {}
    for method, m in sorted(per.items()):
        methods[method] = {"accuracy": _r(statistics.mean(m["per_dataset"].values())), **m}

    # resolution: the sweep's seed-0 rows against the recipe's 224 px means of the same methods
    sweep_file, sweep_dataset = SWEEP
    at224 = _recipe_rows(RECIPE_FILES[sweep_dataset][0])
    by_size: dict[int, list[float]] = {}
    swept = set()
    for r in _load(sweep_file)["rows"]:
        if r["backbone"] == BACKBONE and not r.get("extra") and r["method"] in at224:
            by_size.setdefault(r["image_size"], []).append(r["mean"] - at224[r["method"]]["mean"])
            swept.add(r["method"])
    offsets = {str(s): _r(statistics.mean(v)) for s, v in sorted(by_size.items())}
    offsets["224"] = 0.0
    resolution = {
        "offsets": offsets, "methods": sorted(swept), "dataset": sweep_dataset,
        "files": [sweep_file, RECIPE_FILES[sweep_dataset][0]],
        "rule": f"test accuracy at each resolution (seed 0) minus the 3-seed mean at 224 px, mean over "
                f"{', '.join(sorted(swept))}; linear between resolutions, the end values outside them",
    }

    int8_file, int8_row, fp32_row = INT8
    rows = {r["row"]: r for r in _load(int8_file)["rows"]}
    int8_doc = _load(int8_file)
    precision = {
        "fp32": {"offset": 0.0, "from": "the method's figure (fp32 runs)"},
        "int8-frozen": {"offset": 0.0, "from": "no committed run of 8-bit frozen weights alone: taken as fp32"},
        "int8-side": {"offset": _r(rows[int8_row]["test_accuracy"] - rows[fp32_row]["test_accuracy"]),
                      "from": f"{int8_file}: row {int8_row} ({rows[int8_row]['test_accuracy']}) minus row "
                              f"{fp32_row} ({rows[fp32_row]['test_accuracy']}): Rep-Net, MobileNetV2, Fashion-MNIST, "
                              f"{int8_doc['command'].split('--image-size ')[1].split()[0]} px, one seed",
                      "files": [int8_file]},
    }

    options: dict[str, dict] = {}
    for (method, key, value), (name, ablation, reference) in OPTIONS.items():
        runs = _load(name)["runs"]
        a = {r["seed"]: r["test_accuracy"] for r in runs if r["method"] == ablation}
        b = {r["seed"]: r["test_accuracy"] for r in runs if r["method"] == reference}
        seeds = sorted(set(a) & set(b))
        diff = statistics.mean(a[s] - b[s] for s in seeds)
        options.setdefault(method, {})[f"{key}={value}"] = {
            "offset": _r(diff), "files": [name],
            "from": f"{name}: {ablation} minus {reference}, seed{'s' if len(seeds) > 1 else ''} "
                    f"{', '.join(map(str, seeds))} ({statistics.mean(a[s] for s in seeds):.3f} vs "
                    f"{statistics.mean(b[s] for s in seeds):.3f})"}

    return {
        "command": COMMAND,
        "what": "expected test accuracy for ranking configurations in `repnet plan` (repnet.training.planner): method figure "
                "+ resolution offset + precision offset + option offset, each from committed benchmark results",
        "backbone": BACKBONE, "image_size": 224,
        "method_rule": "mean over datasets of the method's seed-mean test accuracy in the committed 224 px recipe "
                       "runs (ImageNet MobileNetV2, 1,000 training images, 2 epochs, final epoch)",
        "methods": methods, "resolution": resolution, "precision": precision, "options": options,
    }


def main() -> None:
    from common import write_results

    write_results(OUT, summarize())


if __name__ == "__main__":
    main()
