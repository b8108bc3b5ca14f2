"""``repnet demo``: ImageNet MobileNetV2 -> Fashion-MNIST, Rep-Net against its baselines, offline, on one
shared budget (demo/config.py).

Every method trains through the one loop with the same budget; the report is one table (trainable
parameters, analytic / kept / peak memory, test accuracy, time), ``results.json`` and
``memory_vs_accuracy.png`` in the output folder. :func:`provenance` (the commit and machine a result
came from) is shared with the benchmark scripts. docs/demo.md says why the budget is what it is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from pathlib import Path
import torch
from repnet.demo.config import LINEAR_PROBE, DemoConfig
from repnet.errors import RepnetError
from repnet.storage import RunKind, atomic_write, atomic_write_text, claim_folder, read_json, set_run_state
from repnet.training.run import MEMORY_KEYS, train
from repnet.demo.probe import linear_probe
from repnet.demo.config import method_config, parse_method
from repnet.demo.config import shared_options


COLUMNS = [("method", "method"), ("trainable_params", "trainable"), ("analytic_mb", "analytic MB"),
           ("measured_saved_mb", "kept MB"), ("peak_mb", "peak MB"), ("test_accuracy", "test acc"),
           ("wall_time_s", "time s")]


def _fmt(key, v) -> str:
    if v is None:
        return "-"
    if key == "test_accuracy":
        return f"{100 * v:.2f}%"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    data = [[_fmt(k, r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h), w) in enumerate(zip(columns, widths))),
             "  ".join("-" * w for w in widths)]
    for d in data:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(d, widths))))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Test accuracy vs training memory: analytic (filled) and measured kept-for-backward (hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    xlabel = "training memory (MB, 1e6 bytes): filled = analytic total (papers' model), hollow = measured kept"
    if not any(r.get("analytic_mb") or r.get("measured_saved_mb") for r in rows):
        rows = [{**r, "analytic_mb": r.get("trainable_params")} for r in rows]  # memory not measured
        xlabel = "trainable parameters (memory not measured)"
    for i, r in enumerate(rows):
        acc = r.get("test_accuracy")
        if acc is None:
            continue
        color = f"C{i % 10}"
        a, k = r.get("analytic_mb"), r.get("measured_saved_mb")
        if a:
            ax.scatter([a], [100 * acc], color=color, s=50, zorder=3, label=r["method"])
        if k:
            ax.scatter([k], [100 * acc], facecolors="none", edgecolors=color, s=50, zorder=3,
                       label=None if a else r["method"])
            if a:
                ax.plot([a, k], [100 * acc] * 2, color=color, lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- run
def check_methods(cfg: DemoConfig) -> None:
    """Unknown method names fail before anything runs."""
    from repnet.methods import METHODS

    names = [parse_method(m)[0] for m in cfg.methods]
    for m in names:
        if m != LINEAR_PROBE:
            METHODS.get(m)
    for m in cfg.methods:  # every row's settings (sizes, rates) are valid before the folder is claimed
        if parse_method(m)[0] != LINEAR_PROBE:
            method_config(cfg, m)
    taken = {k for m in names for k in shared_options(cfg, m)}
    unknown = sorted(set(cfg.options) - taken)
    if unknown:
        raise RepnetError(f"--opt {unknown[0]}: none of the compared methods ({', '.join(names)}) has this option; "
                          "see `repnet list -v`")


def compare(cfg: DemoConfig) -> list[dict]:
    """Train every method of ``cfg.methods`` on the shared budget; one result dict per method."""
    check_methods(cfg)
    rows = []
    for i, m in enumerate(cfg.methods):
        if cfg.progress:
            print(f"\n[{i + 1}/{len(cfg.methods)}] {m}")
        if m == LINEAR_PROBE:
            rows.append(linear_probe(cfg))
            continue
        tc = method_config(cfg, m)
        res = train(tc)
        res["method"], res["lr"], res["lr_side"] = m, tc.lr, tc.lr_side
        rows.append(res)
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """Plain-language comparison of repnet with the other rows."""
    by = {r["method"]: r for r in rows}
    if "repnet" not in by:
        return []
    rp, out = by["repnet"], []
    for other in ("last", LINEAR_PROBE, "bias", "tinytl_lb", "full"):
        if other not in by:
            continue
        o = by[other]
        d = 100 * (rp["test_accuracy"] - o["test_accuracy"])
        line = f"repnet vs {other}: {d:+.2f} accuracy points"
        if rp.get("analytic_mb") and o.get("analytic_mb"):
            line += f", {rp['analytic_mb'] / o['analytic_mb']:.2f}x its analytic memory"
        if rp.get("measured_saved_mb") and o.get("measured_saved_mb"):
            line += f", {rp['measured_saved_mb'] / o['measured_saved_mb']:.2f}x its measured kept memory"
        out.append(line)
    return out


def _verify_demo(folder: Path) -> None:
    prev = read_json(folder / "results.json", "demo results")
    if not (isinstance(prev, dict) and {"budget", "rows", "demo_config"} <= set(prev)):
        raise RepnetError(f"{folder} holds a results.json that is not a demo's: it is left as it is; give another --out")


#: ``repnet demo``'s output folder: a rerun replaces an earlier demo there, and nothing else.
DEMO = RunKind("demo", "results.json", ("results.json", "memory_vs_accuracy.png", "runs"), _verify_demo, "repnet demo")


def run(cfg: DemoConfig) -> dict:
    t0 = time.time()
    check_methods(cfg)
    out = claim_folder(cfg.out_dir, kind=DEMO, overwrite=True)
    rows = compare(cfg)
    total = time.time() - t0
    budget = (f"{cfg.backbone} (ImageNet) -> {cfg.dataset}: {cfg.image_size}px, {rows[0].get('train_images')} train / "
              f"{rows[0].get('test_images')} test images, {cfg.epochs} epochs at batch {cfg.batch_size}, "
              f"memory at batch {cfg.batch_size} ({cfg.memory} mode)")
    table = format_table(rows)
    lines = verdict(rows)
    print(f"\n{budget}\n{table}\n" + "\n".join(lines) + f"\ntotal time {total:.0f} s")
    plot_path = out / "memory_vs_accuracy.png"
    plot(rows, str(plot_path), budget)
    keep = ("method", "lr", "lr_side", "l2", "trainable_params", "total_params", *MEMORY_KEYS, "test_accuracy",
            "final_test_accuracy", "best_val_accuracy", "train_images_per_s", "wall_time_s", "run_dir",
            "memory_profile_error")
    result = {
        "budget": budget, "demo_config": dataclasses.asdict(cfg), "total_time_s": total, **provenance(),
        "rows": [{k: r[k] for k in keep if k in r} for r in rows], "table": table, "verdict": lines,
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    set_run_state(out, DEMO, "finished")
    print(f"wrote {out / 'results.json'} and {plot_path}")
    return result


def provenance() -> dict:
    """Which code produced a result: the git commit and any uncommitted source files."""
    import subprocess

    root = Path(__file__).resolve().parents[3]

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_src": dirty,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
