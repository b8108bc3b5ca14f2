"""The reproduction harness: the paper's tables as run plans, run, resumed and collected.

Each table is a list of *cells*: one published number (accuracy, and memory where the paper
gives it) with the configuration that produced it (dataset, backbone, method + options, image
size; batch 8 and the dataset's recipe, SPEC §5). ``repnet reproduce TABLE``:

* plans one training run per configuration (``<root>/<table>/<run-key>/``),
* trains what has no ``results.json`` yet, **resumes** a run that has a checkpoint, skips a
  finished one, and records a run that cannot start (e.g. its dataset is not on disk) as one
  line instead of stopping the others,
* collects every finished run into ``summary.json`` + ``summary.md``: published vs ours,
  accuracy and memory side by side.

``--dry-run`` prints the equivalent ``repnet train`` command of every run (to spread runs
over machines); ``--collect`` only collects. ``--set key=value`` changes every run (e.g. a
quick check: ``--set epochs=1 --set train_subset=200``); the summary records the settings.

The paper's datasets live under ``--data-dir DIR`` as ``DIR/<dataset>`` (TinyTL's ImageFolder
layout or torchvision's native files, see ``repnet list``). ProxylessNAS-Mobile, ResNet-50 and
MobileNetV3 need their ImageNet checkpoints: ``--weights proxylessnas_mobile=PATH`` (repeat per
backbone). MNIST (Table 2's input-reprogramming column) is not a dataset here and is left out.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RepnetError

__all__ = ["Cell", "Table", "TABLES", "plan", "run_table", "collect", "train_command"]

PM = "proxylessnas_mobile"


@dataclass(frozen=True)
class Cell:
    """One published figure and the configuration behind it."""

    row: str
    dataset: str
    backbone: str
    method: str
    image_size: int
    accuracy: float | None = None
    memory_mb: float | None = None
    options: tuple = ()  # sorted (key, value) pairs

    @property
    def key(self) -> str:
        opts = "".join(f"@{k}={v}" for k, v in self.options)
        return f"{self.dataset}-{self.backbone}-{self.method}{opts}-{self.image_size}"


@dataclass(frozen=True)
class Table:
    title: str
    cells: tuple[Cell, ...] = field(default_factory=tuple)


def _cells(row: str, backbone: str, method: str, size: int, memory: float | None, accs: dict,
           options: dict | None = None) -> list[Cell]:
    opts = tuple(sorted((options or {}).items()))
    return [Cell(row, d, backbone, method, size, a, memory, opts) for d, a in accs.items()]


_T3_DATASETS = ("flowers102", "cars", "cub200", "food101", "pets", "aircraft", "cifar10", "cifar100")


def _t3(row, method, size, memory, values):
    return _cells(row, PM, method, size, memory, dict(zip(_T3_DATASETS, values)))


_T1_DATASETS = ("flowers102", "cars", "cub200", "pets", "aircraft")


def _t1(row, options, memory, values):
    return _cells(row, PM, "repnet", 224, memory, dict(zip(_T1_DATASETS, values)), options)


_T2_DATASETS = ("cifar10", "flowers102", "cub200", "aircraft")  # a shorter tuple: the first columns only


def _t2(row, method, backbone, memory, values):
    return _cells(row, backbone, method, 224, memory, dict(zip(_T2_DATASETS, values)))


TABLES: dict[str, Table] = {
    "table3": Table(
        "Rep-Net vs TinyTL-L+B, ProxylessNAS-Mobile, batch 8 (paper Table 3)",
        tuple(
            _t3("TinyTL (L+B) @224", "tinytl_lb", 224, 37.0, (95.5, 85.0, 77.1, 79.7, 91.8, 75.4, 95.9, 81.4))
            + _t3("Rep-Net @224", "repnet", 224, 34.0, (96.1, 85.8, 77.8, 80.5, 91.8, 77.4, 95.9, 81.9))
            + _t3("TinyTL (L+B) @320", "tinytl_lb", 320, 65.0, (96.8, 88.8, 81.0, 82.9, 92.9, 82.3, 96.1, 81.5))
            + _t3("Rep-Net @320", "repnet", 320, 61.0, (97.1, 89.0, 82.3, 83.3, 92.5, 82.4, 96.6, 82.3))
        ),
    ),
    "table1": Table(
        "Connector ablation, ProxylessNAS-Mobile @224, batch 8 (paper Table 1)",
        tuple(
            _t1("none", {"connector": "none"}, None, (93.3, 51.1, 65.5, 88.0, 36.9))
            + _t1("down", {"connector": "down"}, None, (91.8, 73.4, 67.8, 89.6, 56.3))
            + _t1("up", {"connector": "up"}, None, (95.2, 76.8, 71.4, 90.7, 59.3))
            + _t1("dual", {"connector": "dual"}, 34.0, (96.1, 85.8, 77.1, 91.8, 77.4))
            + _t1("dual, every block", {"connector": "dual", "placement": "all"}, 37.0,
                  (96.0, 85.8, 76.8, 91.2, 78.7))
        ),
    ),
    "table2": Table(
        "Rep-Net vs input reprogramming, batch 8 @224 (paper Table 2; its MNIST column is left out)",
        tuple(
            _t2("Adv. Rep / ResNet-50", "input_reprogram", "resnet50", 98.0, (62.8,))
            + _t2("Adv. Rep / MobileNetV2", "input_reprogram", "mobilenet_v2", 53.0, (58.3,))
            + _t2("Adv. Rep / MobileNetV3", "input_reprogram", "mobilenet_v3_large", 42.0, (59.4,))
            + _t2("Adv. Rep + Last / ResNet-50", "input_reprogram_last", "resnet50", 99.0, (92.8, 91.1, 66.9, 55.8))
            + _t2("Adv. Rep + Last / MobileNetV2", "input_reprogram_last", "mobilenet_v2", 54.0,
                  (85.1, 91.8, 66.8, 52.2))
            + _t2("Adv. Rep + Last / MobileNetV3", "input_reprogram_last", "mobilenet_v3_large", 46.0,
                  (92.0, 92.6, 62.3, 54.2))
            + _t2("Rep-Net / ResNet-50", "repnet", "resnet50", 119.0, (96.4, 96.7, 80.3, 85.9))
            + _t2("Rep-Net / MobileNetV2", "repnet", "mobilenet_v2", 51.0, (95.0, 95.0, 76.9, 81.6))
            + _t2("Rep-Net / MobileNetV3", "repnet", "mobilenet_v3_large", 43.0, (95.3, 95.1, 77.5, 78.9))
        ),
    ),
}


def _table(name: str) -> Table:
    if name not in TABLES:
        raise RepnetError(f"unknown table '{name}'; choose from: {', '.join(TABLES)}")
    return TABLES[name]


def _split(value, what: str, valid) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [v for v in items if str(v) not in {str(x) for x in valid}]
    if bad:
        raise RepnetError(f"{what} {', '.join(map(str, bad))} not in this table; choose from: "
                          f"{', '.join(sorted({str(x) for x in valid}))}")
    return items


def select(table: str, datasets=None, methods=None, image_sizes=None, backbones=None) -> list[Cell]:
    """The table's cells, filtered (comma-separated strings or lists)."""
    cells = list(_table(table).cells)
    ds = _split(datasets, "dataset", {c.dataset for c in cells})
    ms = _split(methods, "method", {c.method for c in cells})
    ss = _split(image_sizes, "image size", {c.image_size for c in cells})
    bs = _split(backbones, "backbone", {c.backbone for c in cells})
    return [c for c in cells if (ds is None or c.dataset in ds) and (ms is None or c.method in ms)
            and (ss is None or str(c.image_size) in ss) and (bs is None or c.backbone in bs)]


@dataclass
class Run:
    key: str
    overrides: dict
    cells: list[Cell]


def plan(table: str, root: str | Path, data_dir: str | Path | None = None, weights: dict | None = None,
         settings: dict | None = None, **filters) -> list[Run]:
    """One run per distinct configuration of the (filtered) table, in table order."""
    runs: dict[str, Run] = {}
    weights = weights or {}
    for c in select(table, **filters):
        if c.key not in runs:
            ov = {"dataset": c.dataset, "backbone": c.backbone, "method": c.method, "image_size": c.image_size,
                  "batch_size": 8, "options": dict(c.options), "out_dir": str(Path(root) / table / c.key)}
            if data_dir is not None:
                ov["data_root"] = str(Path(data_dir) / c.dataset)
            if c.backbone in weights:
                ov["weights"] = str(weights[c.backbone])
            ov.update(settings or {})
            if "options" in (settings or {}):
                ov["options"] = {**dict(c.options), **settings["options"]}
            runs[c.key] = Run(c.key, ov, [])
        runs[c.key].cells.append(c)
    return list(runs.values())


def train_command(run: Run) -> str:
    """The ``repnet train`` command line equivalent to ``run``."""
    from .config import train_arguments

    return " ".join(shlex.quote(p) for p in ["repnet", "train", *train_arguments(run.overrides)])


def run_one(run: Run) -> tuple[str, str]:
    """Train, resume or skip one run: ``(status, message)``; status done | trained | resumed | error."""
    from .config import FIELDS, TrainConfig, _read_yaml, coerce, make_config
    from .training import train

    out = Path(run.overrides["out_dir"])
    if (out / "results.json").is_file():
        return "done", "finished earlier"
    try:
        if (out / "checkpoint.pt").is_file():
            base = {k: coerce(k, v) for k, v in _read_yaml(out / "config.yaml").items()}
            wanted = make_config(run.overrides).to_dict()
            changed = sorted(k for k, f in FIELDS.items() if not f.metadata.get("runtime")
                             and wanted.get(k) != base.get(k, wanted.get(k)))
            if changed:
                return "error", (f"{out} was started with other settings ({', '.join(changed)}); "
                                 "delete it to start over, or use the settings it was started with")
            train(TrainConfig(**base), resume=str(out))
            return "resumed", "resumed from its checkpoint"
        train(make_config(run.overrides))
        return "trained", "trained"
    except RepnetError as e:
        return "error", str(e)


def run_table(table: str, root: str | Path, data_dir=None, weights=None, settings=None, **filters) -> list[dict]:
    """Run (or resume / skip) every planned run, then collect; returns one status dict per run."""
    runs = plan(table, root, data_dir, weights, settings, **filters)
    statuses = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.key}")
        status, msg = run_one(run)
        if status == "error":
            print(f"  skipped: {msg}")
        statuses.append({"key": run.key, "status": status, "message": msg})
    collect(table, root, statuses=statuses, settings=settings, **filters)
    return statuses


def _fmt(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def collect(table: str, root: str | Path, statuses: list[dict] | None = None, settings: dict | None = None,
            write: bool = True, **filters) -> dict:
    """Published vs ours for every (filtered) cell; writes ``summary.json`` / ``summary.md``."""
    from .storage import atomic_write_text

    tdir = Path(root) / table
    rows = []
    for c in select(table, **filters):
        res_path = tdir / c.key / "results.json"
        res = json.loads(res_path.read_text()) if res_path.is_file() else None
        acc = None if res is None else 100.0 * res["test_accuracy"]
        mem = None if res is None else res.get("analytic_mb")
        rows.append({
            "row": c.row, "dataset": c.dataset, "backbone": c.backbone, "method": c.method,
            "options": dict(c.options), "image_size": c.image_size, "run": c.key,
            "published_accuracy": c.accuracy, "accuracy": acc,
            "accuracy_delta": None if acc is None or c.accuracy is None else round(acc - c.accuracy, 2),
            "published_memory_mb": c.memory_mb, "memory_mb": mem,
            "settings": None if res is None else {k: res["config"].get(k) for k in
                                                  ("epochs", "batch_size", "image_size", "train_subset",
                                                   "test_subset", "max_steps", "select_best_on")},
        })
    summary = {"table": table, "title": _table(table).title, "root": str(tdir), "settings": settings or {},
               "finished": sum(r["accuracy"] is not None for r in rows), "cells": len(rows), "rows": rows}
    if statuses is not None:
        summary["runs"] = statuses
    lines = [f"# {summary['title']}", "",
             f"{summary['finished']} of {summary['cells']} cells finished; test accuracy (%) of the final "
             f"epoch, analytic memory (MB, batch 8).", "",
             "| row | dataset | published acc | ours | delta | published MB | ours MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["accuracy_delta"] is None else f"{r['accuracy_delta']:+.1f}"
        lines.append(f"| {r['row']} | {r['dataset']} | {_fmt(r['published_accuracy'])} | {_fmt(r['accuracy'])} | "
                     f"{delta} | {_fmt(r['published_memory_mb'], 0)} | {_fmt(r['memory_mb'])} |")
    if settings:
        lines += ["", "Settings changed from the paper's recipe: "
                  + ", ".join(f"{k}={v}" for k, v in settings.items())]
    md = "\n".join(lines) + "\n"
    if write:
        tdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tdir / "summary.json", json.dumps(summary, indent=2))
        atomic_write_text(tdir / "summary.md", md)
    summary["markdown"] = md
    return summary
