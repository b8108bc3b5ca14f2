"""Memory benchmark: every registered method, memory engine vs plain PyTorch.

For each backbone (default: mobilenet_v2, proxylessnas_mobile) at 224 px, batch 8,
102 classes, and each method in ``repnet.METHODS``, in both execution modes
(the engine with frozen weights as int8 codes - the papers' 1 B per frozen parameter, the
default of ``repnet profile`` -, the engine with fp32 frozen weights, and ``memory="vanilla"``):

* analytic: the papers' figure (docs/memory.md: peak activation x batch + params) and what the
  rules say is kept for backward (+ frozen norms with batch statistics, reported apart),
* measured kept-for-backward: every tensor autograd saves in one training forward
  (``repnet.memory.measure_saved_bytes``),
* measured peak of one steady-state training step (forward, backward, Adam step): the exact
  live-tensor peak (``repnet.memory.profile``: weights, optimizer state, activations, buffers;
  the input batch apart, as in the analytic figure), and the whole process's RSS peak increase
  (CPU; CUDA: the allocator's) as the coarse secondary figure,
* training step time (forward + backward + Adam step), mean of ``--steps`` steps after
  ``--warmup``; engine and vanilla steps are interleaved so that machine noise hits both. On
  CPU the comparison uses the process CPU time of single-threaded steps (``--time-threads``):
  wall-clock on a shared machine swings by tens of percent; wall-clock is recorded too.

Targets (repnet, bias, tinytl_lb, last): peak <= 1.15 x (analytic + gradients and Adam state of
what trains), measured kept <= 1.15 x analytic kept; int8-at-rest step time <= 1.15 x the fp32
engine's; engine step time <= 1.2 x vanilla. Writes a JSON (every figure + the exact command) and a bar chart:

    python benchmarks/memory_bench.py                       # -> benchmarks/results/memory_cpu.{json,png}
    python benchmarks/memory_bench.py --device cuda --out benchmarks/results/memory_gpu
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import repnet
from common import command_line, write_results
from repnet.memory import analyze, profile

TARGET_METHODS = ("repnet", "bias", "tinytl_lb", "last")


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_times(models: dict, x, y, steps: int, warmup: int, threads: int | None = None) -> dict:
    """Seconds per training step for each model, steps interleaved so that machine noise hits all.

    Wall-clock and process CPU time are both recorded; on a shared CPU the CPU time of a
    single-threaded step (``threads=1``) is the robust comparison, wall-clock is reported too.
    """
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    for m in models.values():
        m.train()
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    try:
        for i in range(warmup + steps):
            for k, m in models.items():
                _sync(x.device)
                t, c = time.perf_counter(), time.process_time()
                _train_step(m, opts[k], x, y)
                _sync(x.device)
                if i >= warmup:
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.process_time() - c)
    finally:
        torch.set_num_threads(prev)
    return {k: {"mean_s": statistics.mean(wall[k]), "median_s": statistics.median(wall[k]),
                "cpu_mean_s": statistics.mean(cpu[k]), "cpu_median_s": statistics.median(cpu[k]),
                "wall_s": wall[k], "cpu_s": cpu[k]} for k in models}


#: the three ways a model is built here: the engine with frozen weights as int8 codes (what the
#: papers count and `repnet profile` measures by default), the engine with fp32 frozen weights,
#: and plain PyTorch
MODES = {"engine": {"memory": "engine", "frozen_bits": "linear"}, "engine_fp32": {"memory": "engine"},
         "vanilla": {"memory": "vanilla"}}


def bench_method(backbone, method, args, dev) -> dict:
    rec = {"backbone": backbone, "method": method, "image_size": args.image_size, "batch_size": args.batch_size}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(dev)
    models = {}
    for mode, kw in MODES.items():
        torch.manual_seed(0)
        models[mode] = repnet.get_model(backbone, method, args.num_classes, image_size=args.image_size,
                                        pretrained=False, **kw).to(dev)
    a = analyze(models["engine"], args.image_size)
    b = args.batch_size
    rec.update(trainable_params=a.trainable_params, total_params=a.total_params, analytic_mb=a.total_mb(b),
               analytic_saved_mb=a.saved_mb(b), analytic_frozen_bn_extra_mb=a.frozen_bn_extra_mb(b),
               bn=models["engine"].options.bn)
    for mode, m in models.items():
        p = profile(m, batch_size=b, image_size=args.image_size, measure=True, peak=not args.no_peak,
                    rss=not args.no_peak and not args.no_rss)
        rec[f"{mode}_measured_saved_mb"] = p["measured_saved_mb"]
        rec[f"{mode}_peak_mb"] = p["peak_mb"]  # exact live-tensor peak of a step, the input batch apart
        rec[f"{mode}_peak_breakdown_mb"] = p["peak_breakdown_mb"]
        rec[f"{mode}_rss_peak_mb"] = p["rss_peak_mb"] if dev.type == "cpu" else p["cuda_allocator_peak_mb"]
        if mode == "engine":
            rec["analytic_with_optimizer_mb"] = p["analytic_with_optimizer_mb"]
            rec["analytic_breakdown_mb"] = p["analytic_breakdown_mb"]
    kept_ref = a.saved_mb(b) + a.frozen_bn_extra_mb(b)
    rec["engine_kept_over_analytic"] = rec["engine_measured_saved_mb"] / kept_ref if kept_ref else None
    if rec["engine_peak_mb"] is not None:
        rec["engine_peak_over_analytic"] = rec["engine_peak_mb"] / rec["analytic_with_optimizer_mb"]
    if args.steps > 0:
        t = step_times(models, x, y, args.steps, args.warmup, args.time_threads if dev.type == "cpu" else None)
        for mode in MODES:
            rec[f"{mode}_step_s"] = t[mode]["mean_s"]
            rec[f"{mode}_step_median_s"] = t[mode]["median_s"]
            rec[f"{mode}_step_cpu_s"] = t[mode]["cpu_mean_s"]
            rec[f"{mode}_step_cpu_median_s"] = t[mode]["cpu_median_s"]
            rec[f"{mode}_step_wall_all_s"] = t[mode]["wall_s"]
        key = "cpu_mean_s" if dev.type == "cpu" else "mean_s"
        rec["engine_over_vanilla_wall"] = t["engine_fp32"]["mean_s"] / t["vanilla"]["mean_s"]
        rec["engine_over_vanilla_time"] = t["engine_fp32"][key] / t["vanilla"][key]
        rec["int8_over_fp32_time"] = t["engine"][key] / t["engine_fp32"][key]
    return rec


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in rows})
    series = [("analytic_mb", "analytic total (paper)"), ("analytic_with_optimizer_mb", "analytic + optimizer"),
              ("engine_measured_saved_mb", "measured kept, engine"),
              ("engine_peak_mb", "peak, engine (8-bit frozen)"), ("engine_fp32_peak_mb", "peak, engine (fp32)"),
              ("vanilla_peak_mb", "peak, PyTorch"), ("engine_rss_peak_mb", "RSS peak, engine")]
    fig, axes = plt.subplots(len(backbones), 1, figsize=(13, 4.2 * len(backbones)), squeeze=False)
    for ax, bb in zip(axes[:, 0], backbones):
        rs = [r for r in rows if r["backbone"] == bb and "error" not in r]
        width = 0.8 / len(series)
        for k, (key, name) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(rs))]
            ax.bar(xs, [max(r.get(key) or 0.0, 1e-2) for r in rs], width, label=name)
        ax.set_xticks(range(len(rs)), [r["method"] for r in rs], fontsize=8, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("MB (1e6 bytes)")
        ax.set_title(f"{bb}: {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    cols = [("backbone", "backbone", 19), ("method", "method", 20), ("analytic_mb", "paper MB", 8),
            ("analytic_saved_mb", "kept(an)", 8), ("analytic_frozen_bn_extra_mb", "+bnB(an)", 8),
            ("engine_measured_saved_mb", "kept(eng)", 9), ("vanilla_measured_saved_mb", "kept(van)", 9),
            ("engine_kept_over_analytic", "eng/an", 6), ("analytic_with_optimizer_mb", "an+opt", 7),
            ("engine_peak_mb", "peak(eng)", 9), ("engine_peak_over_analytic", "pk/an", 5),
            ("engine_fp32_peak_mb", "peak(fp32)", 10), ("vanilla_peak_mb", "peak(van)", 9),
            ("engine_rss_peak_mb", "rss(eng)", 8), ("engine_step_cpu_s", "cpu eng", 7),
            ("engine_fp32_step_cpu_s", "cpu fp32", 8), ("vanilla_step_cpu_s", "cpu van", 7),
            ("int8_over_fp32_time", "t 8/32", 6), ("engine_over_vanilla_time", "t e/v", 5)]
    print("  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (_, h, w) in enumerate(cols)))
    for r in rows:
        if "error" in r:
            print(f"{r['backbone']:<19}  {r['method']:<20}  error: {r['error']}")
            continue
        cells = []
        for i, (k, _, w) in enumerate(cols):
            v = r.get(k)
            s = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
            cells.append(s.rjust(w) if i > 1 else s.ljust(w))
        print("  ".join(cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="mobilenet_v2,proxylessnas_mobile")
    p.add_argument("--methods", default="all", help="comma list or 'all' (every registered method)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=102)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per mode (0: no timing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--time-threads", type=int, default=1,
                   help="CPU threads while timing steps (compared by process CPU time; 0 = --threads)")
    p.add_argument("--no-peak", action="store_true", help="skip the measured peaks")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS peak (a subprocess per model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/memory_cpu", help="output stem (.json, .png)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    methods = list(repnet.METHODS) if args.methods == "all" else args.methods.split(",")
    rows = []
    t0 = time.time()
    for bb in args.backbones.split(","):
        for m in methods:
            t = time.time()
            try:
                rec = bench_method(bb, m, args, dev)
            except Exception as e:  # noqa: BLE001 - a method that cannot be profiled is reported, not fatal
                last = (str(e).strip().splitlines() or [""])[-1]
                rec = {"backbone": bb, "method": m, "error": f"{type(e).__name__}: {last}"}
            rec["bench_s"] = time.time() - t
            rows.append(rec)
            print(f"[{time.time() - t0:7.1f}s] {bb} {m}: " + ("error " + rec["error"] if "error" in rec else
                  f"kept eng {rec['engine_measured_saved_mb']:.2f} MB / analytic {rec['analytic_saved_mb']:.2f} MB, "
                  f"vanilla {rec['vanilla_measured_saved_mb']:.2f} MB"), flush=True)
    checks = []
    for r in rows:
        if "error" in r:
            continue
        if r["method"] in TARGET_METHODS and r.get("engine_peak_over_analytic") is not None:
            checks.append({"check": f"{r['backbone']}/{r['method']}: peak <= 1.15 x analytic + optimizer",
                           "value": r["engine_peak_over_analytic"], "ok": r["engine_peak_over_analytic"] <= 1.15})
        if r["method"] in TARGET_METHODS and r.get("engine_kept_over_analytic") is not None:
            checks.append({"check": f"{r['backbone']}/{r['method']}: measured kept <= 1.15 x analytic kept",
                           "value": r["engine_kept_over_analytic"], "ok": r["engine_kept_over_analytic"] <= 1.15})
        if r.get("int8_over_fp32_time") is not None:
            checks.append({"check": f"{r['backbone']}/{r['method']}: int8-at-rest step <= 1.15 x fp32 engine step",
                           "value": r["int8_over_fp32_time"], "ok": r["int8_over_fp32_time"] <= 1.15})
        if r.get("engine_over_vanilla_time") is not None:
            checks.append({"check": f"{r['backbone']}/{r['method']}: engine step <= 1.2 x vanilla",
                           "value": r["engine_over_vanilla_time"], "ok": r["engine_over_vanilla_time"] <= 1.2})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line(argv),
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "time_threads": args.time_threads if dev.type == "cpu" else None,
            "step_time_basis": "process CPU time" if dev.type == "cpu" else "wall-clock",
            "torch": torch.__version__, "repnet": repnet.__version__, "total_s": time.time() - t0,
            "peak_kind": None if args.no_peak else "live tensors (PyTorch memory profiler), input batch apart",
            "rss_kind": None if args.no_peak or args.no_rss else (
                "cuda-allocator" if dev.type == "cuda" else "cpu-rss (coarse, whole process)"),
            "modes": {k: v for k, v in MODES.items()},
            "notes": "MB = 1e6 bytes; analytic per docs/memory.md; 'kept' = saved for backward; 'engine' = frozen weights "
                     "as int8 codes (what the papers count), 'engine_fp32' = fp32 frozen weights; step "
                     "optimizer Adam; pretrained=False (memory does not depend on the weights)"}
    write_results(out.with_suffix(".json"), {"meta": meta, "rows": rows, "checks": checks})
    plot(rows, out.with_suffix(".png"), f"{args.image_size}px, batch {args.batch_size}, {args.num_classes} classes")
    print()
    print_table(rows)
    print()
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'MISS'} {c['check']}: {c['value']:.3f}")
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
