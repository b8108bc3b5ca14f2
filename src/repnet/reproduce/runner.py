"""``repnet reproduce``: a table's cells as training runs under ``<root>/<table>/<run>/`` - trained,
resumed from their checkpoint, skipped when finished, a run that cannot start reported in one line - and
the finished ones collected into ``summary.json`` / ``summary.md`` beside the paper's figures.

:func:`plan` turns the selected cells into runs, :func:`train_command` into the equivalent ``repnet
train`` command (``--dry-run``), :func:`run_table` trains them, :func:`collect` gathers the results.
docs/reproduce.md.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from repnet.errors import RepnetError
from repnet.reproduce.tables import TABLES, Cell, Table, get_table, select


__all__ = ["Cell", "Table", "TABLES", "plan", "run_table", "collect", "train_command"]


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
    from repnet.config.flags import train_arguments

    return " ".join(shlex.quote(p) for p in ["repnet", "train", *train_arguments(run.overrides)])


def run_one(run: Run) -> tuple[str, str]:
    """Train, resume or skip one run: ``(status, message)``; status done | trained | resumed | error."""
    from repnet.config.schema import FIELDS, TrainConfig, coerce
    from repnet.config.recipes import make_config, read_yaml
    from repnet.training.run import train

    out = Path(run.overrides["out_dir"])
    if (out / "results.json").is_file():
        return "done", "finished earlier"
    try:
        if (out / "checkpoint.pt").is_file():
            base = {k: coerce(k, v) for k, v in read_yaml(out / "config.yaml").items()}
            wanted = make_config(run.overrides).to_dict()
            changed = sorted(k for k, f in FIELDS.items() if not f.metadata.get("runtime")
                             and wanted.get(k) != base.get(k, wanted.get(k)))
            if changed:
                return "error", (f"{out} was started with other settings ({', '.join(changed)}); "
                                 "delete it to start over, or use the settings it was started with")
            cfg = TrainConfig(**base)
            cfg.validate()
            train(cfg, resume=str(out))
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
    from repnet.storage import atomic_write_text
    from repnet.training.run import read_results

    tdir = Path(root) / table
    rows = []
    for c in select(table, **filters):
        res_path = tdir / c.key / "results.json"
        res = read_results(tdir / c.key) if res_path.is_file() else None
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
    summary = {"table": table, "title": get_table(table).title, "root": str(tdir), "settings": settings or {},
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
