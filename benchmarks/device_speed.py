"""Device training speed: repnet's kernels vs the portable program vs repnet's eager engine.

For each backbone x method (default: MobileNetV2 and ProxylessNAS-Mobile x repnet, bias, last, at
224 px, batch 8, 102 classes, random weights: speed does not depend on them), the model as
``repnet train --runtime executorch`` builds it (repnet.runtime.executorch.program.program_build: frozen weights
in 8 bits, Rep-Net's modules with GroupNorm), three ways of running one training step:

* ``kernels``: the training program on repnet's kernels (repnet.runtime.executorch.kernels), on ExecuTorch's
  Python runtime (RuntimeTrainer: forward_backward + the runtime's SGD, momentum 0.9);
* ``cpp``: the same program (with its metadata) in ``repnet-device``, the C++ trainer (its SGD, momentum
  0.9): a fresh process per timed step runs two steps and reports its own time of the second (1 thread: no
  thread pool; 2: the runtime's pool, the machine's cores);
* ``portable``: the same program with ExecuTorch's portable kernels only (``kernels=False``);
* ``eager``: repnet's eager engine on the same model (``memory="engine"``, frozen weights in 8 bits),
  a PyTorch step (forward, backward, SGD with momentum 0.9).

Steps are interleaved (one of each mode in turn, at each thread count in turn) so that machine
noise hits all; each figure is the median over the timed steps after ``--warmup`` (the minimum is
recorded too), as wall-clock and as the process CPU time of the step. Memory: each program's
planned arena (memory planning) and, in a fresh process per mode, the peak RSS of loading the
program and running two steps (``/proc/self/status`` VmHWM after resetting it, so the exporter's
and the interpreter's own memory are left out; the eager engine's likewise, after building the
model). Bar (issue 23): kernels' step <= 1.5 x eager's at 1 thread on every row, arena and peak RSS
<= the portable program's + 5 %.

    python benchmarks/device_speed.py                               # the full table (~35 min; the portable
                                                                    # program takes ~25 s a step at 1 thread)
    python benchmarks/device_speed.py --backbones mobilenet_v2 --methods bias --image-size 64 --batch-size 2 \\
        --threads 1 --steps 2 --portable-steps 1 --out /tmp/device_speed_smoke.json      # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import repnet
from common import command_line, write_results
from repnet.runtime.executorch.trainer import RuntimeTrainer
from repnet.runtime.executorch.program import export_training_program, program_build

MODES = ("kernels", "cpp", "portable", "eager")


def build(backbone: str, method: str, args, memory: str = "vanilla") -> nn.Module:
    torch.manual_seed(0)
    kw = {**program_build(method), "memory": memory}
    return repnet.get_model(backbone, method, args.num_classes, image_size=args.image_size, pretrained=False, **kw)


class EagerStep:
    """repnet's eager engine: forward, backward, SGD (momentum 0.9) - what the runtime's step does."""

    def __init__(self, model: nn.Module):
        self.model = model.train()
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss


class CppStep:
    """The C++ trainer (repnet-device) on the kernels' program: one fresh process per call runs 2 steps of the
    same batch (SGD, momentum 0.9) and reports its own per-step time; the second step is the one timed (the
    first pays for the page faults of loading). Threads: 1 = no pool, more = the runtime's pool (the machine's
    cores: the trainer's only other setting)."""

    timed = True

    def __init__(self, model: nn.Module, prog, x, y, tmp: Path, name: str):
        from repnet.runtime.device import files
        from repnet.runtime.device.runner import find_binary

        sgd = {"name": "sgd", "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
        meta = files.program_metadata(model, prog, lr=1e-3, lr_side=1e-3, optimizer=sgd, total_steps=2,
                                      schedule="constant")
        self.pte, _ = files.write_program(tmp, prog, meta, name=name)
        self.data = tmp / f"{name}.rpd"
        files.write_dataset([(x[i], int(y[i])) for i in range(len(x))] * 2, self.data, model.num_classes)
        self.binary, self.tmp, self.threads, self.calls = find_binary(), tmp, 1, 0

    def step(self, x, y) -> tuple[float, float]:
        from repnet.runtime.device.runner import run_device

        self.calls += 1
        events = run_device(["train", "--program", self.pte, "--train", self.data, "--out",
                             self.tmp / f"cpp-run-{self.calls}", "--epochs", 1, "--max-steps", 2, "--no-checkpoint",
                             "--no-adapter", "--threads", 1 if self.threads == 1 else 0], binary=self.binary)
        steps = [e for e in events if e["event"] == "step"]
        return steps[-1]["step_time_s"], float("nan")  # (the child's CPU time per step is not reported)


def set_threads(n: int) -> None:
    from repnet.runtime.executorch.kernels import set_runtime_threads

    torch.set_num_threads(n)
    set_runtime_threads(n)


def time_steps(steppers: dict, x, y, threads: list[int], steps: dict, warmup: int) -> dict:
    """{(mode, threads): {"wall_s": [...], "cpu_s": [...]}} with steps interleaved across modes and threads."""
    out = {(m, t): {"wall_s": [], "cpu_s": []} for m in steppers for t in threads}
    for i in range(warmup + max(steps.values())):
        for t in threads:
            set_threads(t)
            for mode, st in steppers.items():
                if i >= warmup + steps[mode]:
                    continue
                if getattr(st, "timed", False):  # a stepper that times its own step (another process)
                    st.threads = t
                    w, c = st.step(x, y)
                else:
                    w, c = time.perf_counter(), time.process_time()
                    st.step(x, y)
                    w, c = time.perf_counter() - w, time.process_time() - c
                if i >= warmup:
                    out[(mode, t)]["wall_s"].append(w)
                    out[(mode, t)]["cpu_s"].append(c)
    return out


# ----------------------------------------------------------------------------- peak RSS (fresh processes)
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss_child(spec: dict) -> dict:
    """In a fresh process: the peak RSS of running two steps (the program loaded from ``spec["pte"]``, or the
    eager engine's model built), over the RSS just before."""
    torch.set_num_threads(spec["threads"])
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    y = torch.zeros(spec["batch"], dtype=torch.long)
    if spec["mode"] == "eager":
        ns = argparse.Namespace(num_classes=spec["classes"], image_size=spec["size"])
        stepper = EagerStep(build(spec["backbone"], spec["method"], ns, memory="engine"))
        base_kb, reset = _status_kb("VmRSS"), _reset_peak()
        for _ in range(2):
            stepper.step(x, y)
    else:
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

        from repnet.runtime.executorch.kernels import load_kernels, set_runtime_threads

        if spec["kernels"]:
            load_kernels()
        set_runtime_threads(spec["threads"])
        with open(spec["pte"], "rb") as f:
            buffer = f.read()
        base_kb, reset = _status_kb("VmRSS"), _reset_peak()
        mod = _load_for_executorch_for_training_from_buffer(buffer)  # (reads the buffer in place: keep it)
        sgd = None
        for _ in range(2):
            mod.forward_backward("forward", (x, y))
            grads = mod.named_gradients()
            if sgd is None:
                sgd = get_sgd_optimizer(dict(mod.named_parameters()), 1e-3, 0.9, 0.0, 0.0, False)
            sgd.step(grads)
    peak_kb = _status_kb("VmHWM")
    return {"peak_rss_mb": peak_kb * 1024 / 1e6, "base_rss_mb": base_kb * 1024 / 1e6,
            "step_rss_mb": (peak_kb - base_kb) * 1024 / 1e6, "peak_reset": reset}


def rss_in_child(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        err = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {res.returncode}: {err[:200]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- one row
def bench_row(backbone: str, method: str, args, tmp: Path) -> list[dict]:
    from repnet.runtime.executorch.kernels import load_kernels

    load_kernels()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    progs, steppers, export_s = {}, {}, {}
    for mode in ("kernels", "portable"):
        model = build(backbone, method, args).eval()
        t = time.time()
        progs[mode] = export_training_program(model, args.batch_size, args.image_size, kernels=mode == "kernels",
                                              evaluate=mode == "kernels" and "cpp" in args.modes)
        export_s[mode] = time.time() - t
        steppers[mode] = RuntimeTrainer(model, progs[mode], lr=1e-3, lr_side=1e-3, momentum=0.9)
        (tmp / f"{mode}.pte").write_bytes(progs[mode].buffer)
        if mode == "kernels" and "cpp" in args.modes:
            steppers["cpp"] = CppStep(model, progs[mode], x, y, tmp, f"{backbone}-{method}")
    steppers["eager"] = EagerStep(build(backbone, method, args, memory="engine"))
    steppers = {m: steppers[m] for m in args.modes}
    threads = [int(t) for t in args.threads.split(",")]
    steps = {m: args.portable_steps if m == "portable" else args.steps for m in steppers}
    t = time_steps(steppers, x, y, threads, steps, args.warmup)
    rss = {}
    for mode in (m for m in steppers if m != "cpp"):  # (the C++ trainer's peak RSS: benchmarks/device_memory.py)
        spec = {"mode": mode, "kernels": mode == "kernels", "pte": str(tmp / f"{mode}.pte"), "threads": threads[0],
                "batch": args.batch_size, "size": args.image_size, "classes": args.num_classes, "backbone": backbone,
                "method": method}
        rss[mode] = rss_in_child(spec) if not args.no_rss else {}
    rows = []
    for th in threads:
        row = {"backbone": backbone, "method": method, "image_size": args.image_size, "batch_size": args.batch_size,
               "threads": th}
        for mode in steppers:
            w, c = t[(mode, th)]["wall_s"], t[(mode, th)]["cpu_s"]
            row[f"{mode}_step_s"] = statistics.median(w)
            row[f"{mode}_step_min_s"] = min(w)
            if mode != "cpp":
                row[f"{mode}_step_cpu_s"] = statistics.median(c)
            row[f"{mode}_steps_wall_s"] = w
            row.update({f"{mode}_{k}": v for k, v in rss.get(mode, {}).items()})
        for mode, prog in progs.items():
            row[f"{mode}_arena_mb"] = prog.arena_bytes / 1e6
            row[f"{mode}_planned_mb"] = prog.planned_bytes / 1e6
            row[f"{mode}_export_s"] = export_s[mode]
        if "eager" in steppers and "kernels" in steppers:
            row["kernels_over_eager"] = row["kernels_step_s"] / row["eager_step_s"]
            row["kernels_over_eager_cpu"] = row["kernels_step_cpu_s"] / row["eager_step_cpu_s"]
        if "eager" in steppers and "cpp" in steppers:
            row["cpp_over_eager"] = row["cpp_step_s"] / row["eager_step_s"]
        if "portable" in steppers and "kernels" in steppers:
            row["portable_over_kernels"] = row["portable_step_s"] / row["kernels_step_s"]
            if "peak_rss_mb" in rss.get("kernels", {}) and "peak_rss_mb" in rss.get("portable", {}):
                row["kernels_rss_over_portable"] = rss["kernels"]["step_rss_mb"] / rss["portable"]["step_rss_mb"]
        row["kernels_arena_over_portable"] = progs["kernels"].arena_bytes / progs["portable"].arena_bytes
        row["rewrites"] = progs["kernels"].rewrites
        rows.append(row)
    return rows


def checks(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        name = f"{r['backbone']} {r['method']} {r['threads']}t"
        if r["threads"] == 1 and "kernels_over_eager" in r:
            out.append({"check": f"{name}: kernels step <= 1.5 x eager", "value": r["kernels_over_eager"],
                        "ok": r["kernels_over_eager"] <= 1.5, "goal_1x": r["kernels_over_eager"] <= 1.0})
        if r["threads"] == 1 and "cpp_over_eager" in r:
            out.append({"check": f"{name}: C++ trainer step <= 1.5 x eager", "value": r["cpp_over_eager"],
                        "ok": r["cpp_over_eager"] <= 1.5, "goal_1x": r["cpp_over_eager"] <= 1.0})
        out.append({"check": f"{name}: arena <= portable + 5 %", "value": r["kernels_arena_over_portable"],
                    "ok": r["kernels_arena_over_portable"] <= 1.05})
        if "kernels_rss_over_portable" in r:
            out.append({"check": f"{name}: step peak RSS <= portable + 5 %", "value": r["kernels_rss_over_portable"],
                        "ok": r["kernels_rss_over_portable"] <= 1.05})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.6), squeeze=False)
    colors = {"kernels": "#2a7", "cpp": "#8c4", "portable": "#c44", "eager": "#47c"}
    for ax, th in zip(axes[0], threads):
        rs = [r for r in rows if r["threads"] == th]
        modes = [m for m in MODES if f"{m}_step_s" in rs[0]]
        width = 0.8 / len(modes)
        for k, m in enumerate(modes):
            xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(rs))]
            vals = [r[f"{m}_step_s"] for r in rs]
            ax.bar(xs, vals, width, label={"kernels": "repnet kernels (Python runtime)",
                                            "cpp": "repnet kernels (C++ trainer)", "portable": "portable program",
                                            "eager": "eager engine"}[m], color=colors[m])
            if m == "kernels" and "eager" in modes:
                for xx, r in zip(xs, rs):
                    ax.text(xx, r["kernels_step_s"], f"{r['kernels_over_eager']:.2f}x", ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(rs)), [f"{r['backbone'].replace('_mobile', '')}\n{r['method']}" for r in rs],
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds per training step (median)")
        ax.set_title(f"{rs[0]['image_size']} px, batch {rs[0]['batch_size']}, {th} thread(s)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2,proxylessnas_mobile")
    ap.add_argument("--methods", default="repnet,bias,last")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=102)
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (runtime thread pool and torch)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of the kernels and eager modes")
    ap.add_argument("--portable-steps", type=int, default=2, help="timed steps of the (slow) portable program")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--out", default="benchmarks/results/device_speed.json")
    ap.add_argument("--_rss", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._rss:
        print(json.dumps(_rss_child(json.loads(args._rss))))
        return 0
    args.modes = [m for m in args.modes.split(",") if m]
    if "kernels" not in args.modes:
        ap.error("--modes must include kernels")
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as d:
        for bb in args.backbones.split(","):
            for method in args.methods.split(","):
                for r in bench_row(bb, method, args, Path(d)):
                    rows.append(r)
                    msg = "  ".join(f"{m} {r[f'{m}_step_s']:.3f}s" for m in MODES if f"{m}_step_s" in r)
                    ratio = "".join(f"  {m}/eager {r[f'{m}_over_eager']:.2f}x" for m in ("kernels", "cpp")
                                    if f"{m}_over_eager" in r)
                    print(f"[{time.time() - t0:7.1f}s] {bb} {method} {r['threads']}t: {msg}{ratio}  arena "
                          f"{r['kernels_arena_mb']:.1f} MB (portable {r['portable_arena_mb']:.1f})", flush=True)
    doc = {"benchmark": __doc__.splitlines()[0], "command": command_line(argv),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "_rss")},
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_average_at_end": os.getloadavg()},
           "note": "step times: median wall-clock of the timed steps, interleaved across modes and thread counts "
                   "(min and process CPU time recorded too); peak RSS: a fresh process per mode, two steps at the "
                   "first thread count, VmHWM reset just before loading the program (eager: after building the "
                   "model); cpp: the C++ trainer's own time of its second step, a fresh process per timed step "
                   "(its peak RSS: benchmarks/device_memory.py)",
           "torch": torch.__version__, "repnet": repnet.__version__, "total_s": time.time() - t0,
           "rows": rows, "checks": checks(rows)}
    write_results(args.out, doc)
    plot(rows, Path(args.out).with_suffix(".png"))
    bad = [c for c in doc["checks"] if not c["ok"]]
    print(f"{len(doc['checks']) - len(bad)}/{len(doc['checks'])} checks ok" + "".join(
        f"\n  not ok: {c['check']} ({c['value']:.3f})" for c in bad))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
