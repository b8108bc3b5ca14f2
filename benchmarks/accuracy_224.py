"""Accuracy at the paper's resolution, with seeds: Rep-Net against TinyTL-L+B and the baselines.

Each (method, seed) is one ``repnet train`` run of the dataset's recipe (docs/recipes.md: Adam, two
parameter groups, cosine per step, batch 8, the recipe's label smoothing and augmentation) at
``--image-size`` (default 224), on ``--train-subset`` training images for ``--epochs`` epochs,
tested once at the end (final epoch) on ``--test-subset`` test images. Rows of ``OUT.json``::

    {"method", "backbone", "dataset", "image_size", "seeds": [test accuracy per seed],
     "mean", "std", "kept_mb", ...}

``kept_mb`` is what autograd really keeps for backward at batch 8 (memory engine, measured).
Runs are resumable: each finished run's ``results.json`` is reused, and ``OUT.json`` is
rewritten after every run, so several invocations (other methods, seeds, backbones, sizes)
merge into one file. Every invocation's command line is recorded.

    python benchmarks/accuracy_224.py --dataset fashion_mnist --methods repnet,tinytl_lb,bias,last \\
        --seeds 0,1,2 --train-subset 1000 --test-subset 1000 --epochs 2 --threads 1
    python benchmarks/accuracy_224.py --plot-sweep benchmarks/results/accuracy_224_fashion_mnist.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import command_line, provenance
from repnet.demo.config import parse_method
from repnet.storage import atomic_write_text


def _row_key(r: dict) -> tuple:
    return (r.get("dataset"), r["method"], r["backbone"], r["image_size"])


def _run_key(r: dict, dataset: str) -> tuple:
    """A run's identity; runs recorded before several datasets shared one file carry no dataset."""
    return (r.get("dataset", dataset), r["method"], r["backbone"], r["image_size"])


def label(spec: str, args) -> str:
    """The row's name: the method spec, plus any ``--set`` changes (``repnet[lr_side=3e-3]``)."""
    return spec + (f"[{','.join(args.set)}]" if args.set else "")


def kept_mb(backbone: str, method: str, options: dict, num_classes: int, image_size: int) -> float:
    import repnet

    torch.manual_seed(0)
    model = repnet.get_model(backbone, method, num_classes, image_size=image_size, pretrained=False, **options)
    return repnet.memory.profile(model, batch_size=8, image_size=image_size, peak=False)["measured_saved_mb"]


def run_one(args, spec: str, seed: int, size: int) -> dict:
    from repnet.training.run import make_config, train

    method, options = parse_method(spec)
    tag = label(spec, args).replace("@", "_").replace(",", "_").replace("=", "-").replace("[", "_").replace("]", "")
    tag += "-tuned" if args.tune else ""
    run_dir = Path(args.runs_dir) / args.dataset / args.backbone / f"{size}px" / f"{tag}-s{seed}"
    ov = dict(dataset=args.dataset, backbone=args.backbone, method=method, options=options, image_size=size,
              batch_size=8, epochs=args.epochs, train_subset=args.train_subset, test_subset=args.test_subset,
              seed=seed, workers=args.workers, progress=not args.quiet, profile_memory=False,
              out_dir=str(run_dir), device=args.device, tune=args.tune)
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        ov[k] = v
    cfg = make_config(ov)
    done = run_dir / "results.json"
    if run_dir.exists():  # a finished run is reused, an interrupted one continued - if it ran this config
        import yaml

        ran = yaml.safe_load((run_dir / "config.yaml").read_text())
        stale = {k: (ran.get(k), v) for k, v in cfg.to_dict().items()
                 if k in RECIPE_KEYS and ran.get(k) != v}
        if stale:  # e.g. the dataset's recipe changed since: the cached run is not this row's run
            raise SystemExit(f"{run_dir} ran another config ({stale}); move it away to rerun")
        if done.is_file():
            return json.loads(done.read_text())
        if not (run_dir / "checkpoint.pt").is_file():  # stopped before its first checkpoint: start it again
            return train(cfg, overwrite=True)
        return train(cfg, resume=str(run_dir))
    return train(cfg)


#: The config keys that decide a run's result (a cached run with other values is not reused).
RECIPE_KEYS = ("dataset", "backbone", "method", "options", "image_size", "batch_size", "epochs", "lr", "lr_side",
               "label_smoothing", "augment", "weight_decay", "train_subset", "test_subset", "seed", "int8", "tune",
               "tune_fraction", "val_fraction")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--methods", default="repnet,tinytl_lb,bias,last", help="comma-separated; name@key=value;...")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--image-sizes", default="224", help="comma-separated resolutions (a sweep)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=1000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra training config key (every run)")
    p.add_argument("--tune", action="store_true", help="every run chooses its rate on the validation split first "
                   "(repnet train --tune); default OUT: accuracy_224_<dataset>_tuned.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", default="runs/accuracy_224")
    p.add_argument("--out", default=None, help="OUT.json (default benchmarks/results/accuracy_224_<dataset>.json)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--plot-sweep", metavar="JSON", nargs="+",
                   help="only plot the resolution sweep from these results files (rows merged)")
    p.add_argument("--report", metavar="JSON", nargs="+", help="only print these results files' rows as markdown")
    args = p.parse_args(argv)
    if args.plot_sweep:
        return plot_sweep([Path(f) for f in args.plot_sweep])
    if args.report:
        return report([Path(f) for f in args.report])
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/accuracy_224_{args.dataset}{'_tuned' if args.tune else ''}.json")
    result = json.loads(out.read_text()) if out.is_file() else {
        "benchmark": "accuracy at the paper's resolution (batch 8, the dataset's recipe, final epoch, seeds)",
        "dataset": args.dataset, "rows": [], "runs": [], "commands": []}
    result["commands"].append({"command": command_line(argv), "provenance": provenance(),
                               "budget": {"train_subset": args.train_subset, "test_subset": args.test_subset,
                                          "epochs": args.epochs, "threads": args.threads, "extra": args.set,
                                          "tune": args.tune}})
    specs = [m.strip() for m in args.methods.split(";" if ";" in args.methods else ",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.image_sizes.split(",")]
    kept_cache: dict = {}
    for size in sizes:
        for seed in seeds:  # every method at one seed before the next seed: partial results stay comparable
            for spec in specs:
                t0 = time.time()
                res = run_one(args, spec, seed, size)
                method, options = parse_method(spec)
                run = {"dataset": args.dataset, "method": label(spec, args), "backbone": args.backbone,
                       "image_size": size, "seed": seed,
                       "test_accuracy": res["test_accuracy"], "final_val_accuracy": res.get("final_val_accuracy"),
                       "train_images": res.get("train_images"), "test_images": res.get("test_images"),
                       "steps": res.get("steps"), "lr": res["config"]["lr"], "lr_side": res["config"]["lr_side"],
                       "extra": args.set, "wall_time_s": res.get("wall_time_s"), "run_dir": res.get("run_dir"),
                       "tune": res.get("tune")}
                result["runs"] = [r for r in result["runs"] if (*_run_key(r, result["dataset"]), r["seed"])
                                  != (args.dataset, label(spec, args), args.backbone, size, seed)]
                result["runs"].append(run)
                key = (method, tuple(sorted(options.items())), size)
                if key not in kept_cache:
                    kept_cache[key] = kept_mb(args.backbone, method, options, res["num_classes"], size)
                _update_row(result, spec, args, size, kept_cache[key])
                atomic_write_text(out, json.dumps(result, indent=2))
                print(f"{label(spec, args)} seed {seed} {size}px: test {res['test_accuracy']:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    print(format_rows(result))
    return result


def _update_row(result: dict, spec: str, args, size: int, kept: float) -> None:
    name = label(spec, args)
    runs = sorted((r for r in result["runs"] if _run_key(r, result["dataset"]) ==
                   (args.dataset, name, args.backbone, size)), key=lambda r: r["seed"])
    accs = [r["test_accuracy"] for r in runs]
    row = {"method": name, "backbone": args.backbone, "dataset": args.dataset, "image_size": size,
           "seeds": accs, "seed_ids": [r["seed"] for r in runs], "mean": statistics.fmean(accs),
           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "kept_mb": kept,
           "val_mean": (statistics.fmean(r["final_val_accuracy"] for r in runs)
                        if all(r.get("final_val_accuracy") is not None for r in runs) else None),
           "train_images": runs[-1]["train_images"], "test_images": runs[-1]["test_images"],
           "epochs": args.epochs, "steps": runs[-1]["steps"], "lr": runs[-1]["lr"], "lr_side": runs[-1]["lr_side"],
           "extra": args.set, "tuned": [{"seed": r["seed"], r["tune"]["key"]: r["tune"]["value"]} for r in runs
                                        if r.get("tune")]}
    result["rows"] = [r for r in result["rows"] if _row_key(r) != _row_key(row)] + [row]


def format_rows(result: dict) -> str:
    lines = [f"{'method':<34} {'backbone':<20} {'px':>4} {'mean':>7} {'std':>6} {'kept MB':>8}  seeds"]
    for r in sorted(result["rows"], key=lambda r: (r["backbone"], r["image_size"], -r["mean"])):
        lines.append(f"{r['method']:<34} {r['backbone']:<20} {r['image_size']:>4} {r['mean']:>7.4f} {r['std']:>6.4f} "
                     f"{r['kept_mb']:>8.2f}  {', '.join(f'{a:.4f}' for a in r['seeds'])}")
    return "\n".join(lines)


def report(paths: list[Path]) -> dict:
    """Markdown rows: method, backbone, px, test accuracy mean +- std (seeds), kept MB."""
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    print("| dataset | method | backbone | px | test accuracy (mean +- std) | seeds | kept MB |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["dataset"], r["backbone"], -r["image_size"], -r["mean"])):
        print(f"| {r['dataset']} | {r['method']} | {r['backbone']} | {r['image_size']} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
              f"{', '.join(f'{100 * a:.1f}' for a in r['seeds'])} | {r['kept_mb']:.2f} |")
    return {"rows": rows}


def plot_sweep(paths: list[Path]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in paths]
    rows_all = [r for res in results for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("repnet", "tinytl_lb"):
        rows = sorted((r for r in rows_all if r["method"] == method and r["backbone"] == "mobilenet_v2"),
                      key=lambda r: r["image_size"])
        if rows:
            ax.errorbar([r["image_size"] for r in rows], [100 * r["mean"] for r in rows],
                        yerr=[100 * r["std"] for r in rows], marker="o", capsize=3,
                        label=f"{method} ({rows[-1]['kept_mb']:.1f} MB kept @ {rows[-1]['image_size']} px)")
    ax.set_xlabel("resolution (px)")
    ax.set_ylabel("test accuracy (%)")
    budget = results[0]["commands"][-1]["budget"]
    ax.set_title(f"MobileNetV2 -> {results[0]['dataset']}: accuracy vs resolution\n"
                 f"({budget['train_subset']} train images, {budget['epochs']} epochs, batch 8; 224 px: mean of seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = paths[0].with_name(paths[0].stem + "_sweep.png") if not paths[0].stem.endswith("_sweep") else \
        paths[0].with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    return {"rows": rows_all}


if __name__ == "__main__":
    main()
