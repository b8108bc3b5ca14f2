"""A training-memory profile of a configuration named on the command line: the model built as
``repnet train`` builds it for the chosen runtime, :func:`repnet.memory.profile`'s figures (analytic,
kept for backward, exact peak, RSS), the runtime's own figures beside them, and the bar chart of a set of
profiles.

:func:`profile_one` is one row of ``repnet profile`` (library code: the command only prints it).
docs/memory.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


PROFILE_KEYS = ("backbone", "method", "image_size", "batch_size", "trainable_params", "total_params",
                "analytic_mb", "analytic_with_optimizer_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb",
                "peak_breakdown_mb", "rss_peak_mb")


def profile_one(backbone: str, method: str, image_size: int, batch_size: int, num_classes: int,
                memory: str = "engine", pretrained=False, measure: bool = True, peak: bool = True,
                options: dict | None = None, order: str = "run", runtime: str = "eager",
                frozen_bits: str = "linear", rss: bool = True, optimizer: str | None = None) -> dict:
    """Build the model ``repnet train`` builds for this configuration on ``runtime`` (in ``memory`` mode)
    and return its profile record (the CLI contract's keys, and more), with the runtime's own figures.

    ``frozen_bits``: ``linear`` / ``kmeans`` (frozen weights as 8-bit codes, the papers' setting,
    default) or ``none`` (fp32). ``optimizer``: the step's (default: the recipe's for the runtime)."""
    from repnet.api import get_model
    from repnet.config.build import build_model, int8_settings
    from repnet.config.recipes import make_config
    from repnet.memory import profile
    from repnet.runtime import get_runtime

    overrides = {"backbone": backbone, "method": method, "image_size": image_size, "batch_size": batch_size,
                 "memory": memory, "options": dict(options or {}), "runtime": runtime, "frozen_bits": frozen_bits}
    if optimizer is not None:
        overrides["optimizer"] = optimizer
    cfg = make_config(overrides)
    rt = get_runtime(runtime)
    rt.check(cfg)
    kwargs = {**rt.model_kwargs(cfg), "memory": memory}  # the runtime's model, on the engine or not
    model = get_model(backbone, method, num_classes, image_size=image_size, pretrained=pretrained,
                      int8=int8_settings(cfg), **kwargs)
    rec = {"backbone": backbone, "method": method, "image_size": image_size, "batch_size": batch_size,
           "num_classes": num_classes, "memory_mode": memory, "runtime": runtime,
           "options": dataclasses.asdict(model.options)}
    rec.update(profile(model, batch_size=batch_size, image_size=image_size, measure=measure, peak=peak,
                       rss=peak and rss, order=order, optimizer=cfg.optimizer))
    rec.update(rt.profile(build_model(cfg, num_classes, pretrained=pretrained), cfg, rec))
    return rec


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
    from repnet.storage import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
