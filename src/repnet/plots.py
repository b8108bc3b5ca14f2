"""Plots: memory bar charts across methods, memory-vs-accuracy scatter (matplotlib, Agg)."""
from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_bar_chart(rows: list[dict], path: str, title: str = "") -> None:
    """Grouped bars per method: analytic total, analytic kept, measured kept, peak (MB, log scale)."""
    plt = _plt()
    kinds = sorted({r.get("peak_kind") for r in rows if r.get("peak_kind")})
    peak = "measured peak" + (f" ({', '.join(kinds)})" if kinds else "")  # cpu-rss is coarse, cuda-allocator exact
    series = [("analytic_mb", "analytic total"), ("analytic_saved_mb", "analytic kept"),
              ("measured_saved_mb", "measured kept"), ("peak_mb", peak)]
    labels = [f"{r['method']}" + (f"\n({r['memory_mode']})" if r.get("memory_mode") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    width = 0.8 / len(series)
    for k, (key, name) in enumerate(series):
        vals = [r.get(key) or 0.0 for r in rows]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MB (1e6 bytes)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_accuracy_plot(rows: list[dict], path: str, mem_key: str = "analytic_mb", title: str = "") -> None:
    """Scatter of accuracy vs memory, one labelled point per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        x, y = r.get(mem_key), r.get("test_accuracy", r.get("final_test_accuracy"))
        if x is None or y is None:
            continue
        ax.scatter([x], [100 * y])
        ax.annotate(r["method"], (x, 100 * y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(f"training memory, {mem_key} (MB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
