"""Fit training into a memory budget: the search behind ``repnet plan``.

A configuration (method and Rep-Net's placement, precision, resolution, micro-batch x gradient
accumulation keeping the recipe's effective batch) is listed only if its peak, *measured* by
:func:`measure_peak_mb` on the model ``repnet train`` builds from its printed command, is within the
budget; the analytic figure only decides what is worth measuring (:data:`LOWER_BOUND`). Configurations
are ranked by expected accuracy from the committed results (``expected_accuracy.json``), visited in
that order, with bisection on the batch, so few are measured. docs/plan.md, "How the search works".
"""
from __future__ import annotations

import dataclasses
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repnet.config.build import build_model
from repnet.config.recipes import make_config
from repnet.config.flags import train_arguments
from repnet.errors import RepnetError
from repnet.limits import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_NUM_CLASSES, check_int
from repnet.storage import read_json

__all__ = ["plan", "measure_peak_mb", "parse_budget", "expected_accuracy", "load_expectations", "format_plan",
           "Configuration", "PRECISIONS", "DEFAULT_METHODS", "DEFAULT_SIZES", "EXPECTATIONS"]

#: the committed summary of benchmarks/results that configurations are ranked by
EXPECTATIONS = Path(__file__).parent / "expected_accuracy.json"
DEFAULT_METHODS = ("repnet", "tinytl_lb", "bias", "last")
DEFAULT_SIZES = (224, 192, 160, 128)
MICRO_BATCHES = (8, 4, 2, 1)
#: precision -> the ``repnet train`` config keys that select it (fp32 first: at equal expected
#: accuracy the configuration with no unmeasured change ranks first)
PRECISIONS = {"fp32": {}, "int8-frozen": {"frozen_bits": "linear"}, "int8-side": {"int8": True}}
#: method -> option variants searched (the default first): Rep-Net's connector placement
VARIANTS = {"repnet": ({}, {"placement": "all"})}
#: below this fraction of analytic + optimizer (+ fp32 frozen weights) a configuration is not measured
LOWER_BOUND = 0.9
_UNITS = {"": 1.0, "b": 1e-6, "kb": 1e-3, "mb": 1.0, "gb": 1e3}


# ----------------------------------------------------------------------------- the pieces
def parse_budget(text) -> float:
    """A memory size in MB (1e6 bytes): ``40MB``, ``40 MB``, ``1.5GB``, ``512KB``, ``40`` (MB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise RepnetError(f"--budget {text!r}: expected a size such as 40MB, 40 MB, 1.5GB, 512KB or 40 "
                          "(MB = 1e6 bytes)")
    mb = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (mb > 0 and math.isfinite(mb)):
        raise RepnetError(f"--budget must be more than 0, got {text!r}")
    return mb


def measure_peak_mb(model, batch_size: int, image_size: int) -> float:
    """The measured peak (MB) of one training step of ``model`` at ``batch_size`` x ``image_size`` px.

    The one place the planner measures, so what it lists is what a test re-measures:
    :func:`repnet.memory.profile`'s ``peak_mb``, the exact live-tensor peak of a steady-state
    Adam step (PyTorch's memory profiler; weights, gradients, optimizer state, activations and
    backward buffers alike, less the input batch).
    """
    from repnet.memory import profile

    return profile(model, batch_size=batch_size, image_size=image_size, measure=False, peak=True)["peak_mb"]


def load_expectations(path: str | Path = EXPECTATIONS) -> dict:
    return read_json(path, "accuracy expectations")


def _interpolate(size: int, offsets: dict) -> float:
    pts = sorted((int(k), float(v)) for k, v in offsets.items())
    if size <= pts[0][0]:
        return pts[0][1]
    if size >= pts[-1][0]:
        return pts[-1][1]
    for (a, fa), (b, fb) in zip(pts, pts[1:]):
        if a <= size <= b:
            return fa + (fb - fa) * (size - a) / (b - a)
    raise AssertionError(size)


def expected_accuracy(method: str, options: dict, precision: str, image_size: int,
                      table: dict | None = None) -> tuple[float | None, str]:
    """``(expected test accuracy or None, where it comes from)`` of one configuration: the
    method's committed figure + resolution + option + precision offsets (docs/plan.md)."""
    t = table if table is not None else load_expectations()
    m = t["methods"].get(method)
    if m is None:
        return None, f"no committed benchmark of '{method}': ranked after those with one"
    acc = m["accuracy"]
    seeds = sorted(set(m["seeds"].values()))
    parts = [f"{method} {acc:.4f} = mean of " + ", ".join(f"{d} {v:.4f}" for d, v in m["per_dataset"].items())
             + f" ({', '.join(m['files'])}: {t['backbone']}, {t['image_size']} px, "
             + f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"]
    res = t["resolution"]
    off = _interpolate(image_size, res["offsets"])
    if image_size != t["image_size"]:
        acc += off
        parts.append(f"{image_size} px {off:+.4f} ({res['files'][0]}, mean of {', '.join(res['methods'])})")
    for key, value in sorted(options.items()):
        o = t["options"].get(method, {}).get(f"{key}={value}")
        if o is None:
            parts.append(f"{key}={value} +0 (no committed run)")
        else:
            acc += o["offset"]
            parts.append(f"{key}={value} {o['offset']:+.4f} ({o['from']})")
    p = t["precision"][precision]
    if precision != "fp32":
        acc += p["offset"]
        parts.append(f"{precision} {p['offset']:+.4f} ({p['from']})")
    return acc, "; ".join(parts)


@dataclass
class Configuration:
    """One listed configuration: what it is, its measured peak and its ``repnet train`` command."""

    method: str
    precision: str
    placement: str        # Rep-Net's connector placement; "-" for a method without one
    options: dict
    image_size: int
    micro_batch: int
    accum_steps: int
    peak_mb: float        # measure_peak_mb at micro_batch
    analytic_mb: float    # the papers' figure at micro_batch
    expected_accuracy: float | None
    expected_from: str
    overrides: dict       # the TrainConfig keys the command sets
    command: str
    notes: list = field(default_factory=list)

    def label(self) -> str:
        return describe(self.method, self.options, self.precision, self.image_size, self.micro_batch,
                        self.accum_steps)


def describe(method, options, precision, image_size, micro, accum) -> str:
    opts = "".join(f" {k}={v}" for k, v in sorted(options.items()))
    return f"{method}{opts} {precision} {image_size} px batch {micro} (x{accum})"


def _fmt_mb(mb: float) -> str:
    return f"{mb:.1f}" if mb >= 0.1 else f"{mb:.2g}"


def _train_overrides(dataset, backbone, method, variant, precision, image_size, micro, accum, weights) -> dict:
    ov = {"dataset": dataset, "backbone": backbone, "method": method, "image_size": image_size, "batch_size": micro}
    if accum > 1:
        ov["accum_steps"] = accum
    ov.update(PRECISIONS[precision])
    if weights:
        ov["weights"] = weights
    if variant:
        ov["options"] = dict(variant)
    return ov


def _needs_weights(backbone: str) -> bool:
    """Whether ``repnet train`` needs ``--weights`` for this backbone (no offline weights packaged)."""
    from repnet.backbones import BACKBONES

    try:
        BACKBONES.get(backbone)(True)
    except RepnetError:
        return True
    return False


def _placement(method: str, options: dict) -> str:
    from repnet.methods import METHODS

    fields = {f.name: f.default for f in dataclasses.fields(METHODS.get(method).Options)}
    return str(options.get("placement", fields["placement"])) if "placement" in fields else "-"


class _Combo:
    """One method x option variant x precision: built once per resolution, its non-fits remembered."""

    def __init__(self, method: str, variant: dict, precision: str):
        self.method, self.variant, self.precision = method, variant, precision
        self.unsupported = False
        # (image size, micro-batch) over the budget, measured or by the lower bound: the peak grows
        # with both, so every larger pair is over it too
        self.over: list[tuple[int, int]] = []
        self.listed = False

    def dominated(self, size: int, micro: int) -> bool:
        return any(s <= size and b <= micro for s, b in self.over)


@dataclass
class _Built:
    model: object
    trainable: int
    analytic: object          # repnet.memory.AnalyticReport
    frozen_excess_bytes: int  # fp32 frozen weights' bytes above the analytic model's 1 B each
    batch_norms: bool         # train-mode batch norms: accumulation changes their statistics

    def lower_bound(self, micro: int) -> float:
        return LOWER_BOUND * (self.analytic.total_mb(micro) + (12 * self.trainable + self.frozen_excess_bytes) / 1e6)


class _Search:
    def __init__(self, budget_mb, backbone, dataset, num_classes, weights, progress_bar):
        self.budget, self.backbone, self.dataset = budget_mb, backbone, dataset
        self.num_classes, self.weights, self.bar = num_classes, weights, progress_bar
        self.log: list[dict] = []

    def overrides(self, combo: _Combo, size: int, micro: int, eff: int) -> dict:
        return _train_overrides(self.dataset, self.backbone, combo.method, combo.variant, combo.precision, size,
                                micro, eff // micro, self.weights)

    def build(self, combo: _Combo, size: int, eff: int) -> _Built | None:
        """The model ``repnet train`` builds for this combination at ``size`` (None: unsupported)."""
        from repnet.memory import analyze
        from repnet.memory.quant import is_quantized

        try:
            cfg = make_config(self.overrides(combo, size, eff, eff))  # (the batch size builds nothing)
            model = build_model(cfg, self.num_classes, pretrained=False)
        except RepnetError:  # e.g. int8 training of a method that trains backbone weights
            combo.unsupported = True
            return None
        if combo.precision == "int8-frozen" and not any(is_quantized(m) for m in model.modules()):
            combo.unsupported = True  # nothing frozen to store in 8 bits (full fine-tuning)
        if combo.precision == "int8-side" and not list(model.side_modules()):
            combo.unsupported = True  # no side network (the head alone is not one)
        if combo.unsupported:
            return None
        model.train()
        norms = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        excess = sum(p.numel() * (p.element_size() - 1) for p in model.parameters()
                     if not p.requires_grad and p.is_floating_point())
        return _Built(model, sum(p.numel() for p in model.parameters() if p.requires_grad), analyze(model, size),
                      excess, norms)

    def measure(self, combo: _Combo, built: _Built, size: int, micro: int, eff: int) -> float:
        try:
            peak = measure_peak_mb(built.model, micro, size)
        except ValueError as e:  # a train-mode norm on a 1x1 map at batch 1: this batch cannot train
            if "Expected more than 1 value per channel" not in str(e):
                raise
            peak = math.inf
        self.log.append({"configuration": describe(combo.method, combo.variant, combo.precision, size, micro,
                                                   eff // micro), "peak_mb": peak if math.isfinite(peak) else None})
        if self.bar is not None:
            self.bar.set_postfix(measured=len(self.log), refresh=False)
        if peak > self.budget and math.isfinite(peak):
            combo.over.append((size, micro))
        return peak

    def largest_fit(self, combo: _Combo, built: _Built, size: int, micros: list[int], eff: int):
        """``(micro-batch, peak)`` of the largest micro-batch that fits (bisection), or None."""
        cands = []
        for b in sorted(micros):
            if combo.dominated(size, b):
                break
            if built.lower_bound(b) > self.budget:
                combo.over.append((size, b))
                break
            cands.append(b)
        lo, hi, best = 0, len(cands) - 1, None
        while lo <= hi:
            mid = (lo + hi + 1) // 2  # (the upper middle: the larger batches are the likelier answer)
            b = cands[mid]
            # the peak grows at least with the analytic activation per image above a measured fit
            if best is not None and best[1] + LOWER_BOUND * (b - best[0]) * built.analytic.peak_activation_bytes \
                    / 1e6 > self.budget:
                combo.over.append((size, b))
                hi = mid - 1
                continue
            peak = self.measure(combo, built, size, b, eff)
            if peak <= self.budget:
                best, lo = (b, peak), mid + 1
            else:
                hi = mid - 1
        return best


def plan(budget_mb: float, backbone: str, dataset: str, *, methods=None, image_sizes=None, precisions=None,
         top: int = 5, effective_batch: int | None = None, num_classes: int | None = None,
         weights: str | None = None, progress: bool = True) -> dict:
    """Up to ``top`` configurations whose measured peak fits ``budget_mb`` (MB), best expected first.

    ``methods`` / ``image_sizes`` / ``precisions``: the search space (defaults
    :data:`DEFAULT_METHODS`, :data:`DEFAULT_SIZES`, every one of :data:`PRECISIONS`);
    ``effective_batch``: images per optimizer step (default: the dataset recipe's batch size);
    ``num_classes``: default the dataset's (its files need not be present); ``weights``: the
    backbone checkpoint the printed commands pass (``--weights``; a placeholder ``PATH`` where the
    backbone has no offline weights). Raises :class:`RepnetError` (one line, naming the smallest
    measured configuration) when nothing fits. Returns the JSON document of ``repnet plan --json``.
    """
    from tqdm.auto import tqdm

    from repnet.backbones import BACKBONES
    from repnet.data import dataset_info
    from repnet.methods import METHODS

    methods = list(methods or DEFAULT_METHODS)
    sizes = sorted({int(s) for s in (image_sizes or DEFAULT_SIZES)}, reverse=True)
    precisions = list(precisions or PRECISIONS)
    if not (math.isfinite(budget_mb) and budget_mb > 0):
        raise RepnetError(f"the budget must be more than 0 MB, got {budget_mb}")
    BACKBONES.get(backbone)
    for m in methods:
        METHODS.get(m)
    for p in precisions:
        if p not in PRECISIONS:
            raise RepnetError(f"unknown precision '{p}'; choose from: {', '.join(PRECISIONS)}")
    if any(s < 32 for s in sizes):
        raise RepnetError(f"image sizes must be >= 32, got {min(sizes)}")
    if any(s > MAX_IMAGE_SIZE for s in sizes):
        raise RepnetError(f"image sizes must be <= {MAX_IMAGE_SIZE:,d}, got {max(sizes):,d}")
    if top < 1:
        raise RepnetError(f"--top must be >= 1, got {top}")
    if num_classes is not None:
        check_int("--num-classes", num_classes, 2, MAX_NUM_CLASSES)
    if effective_batch is not None:
        check_int("--effective-batch", effective_batch, 1, MAX_BATCH_SIZE)
    n_classes = num_classes or dataset_info(dataset).num_classes
    if not n_classes:
        raise RepnetError(f"dataset '{dataset}' does not name its number of classes: give --num-classes")
    recipe = make_config({"dataset": dataset, "backbone": backbone})
    eff = recipe.batch_size if effective_batch is None else effective_batch
    if eff < 1:
        raise RepnetError(f"--effective-batch must be >= 1, got {eff}")
    micros = sorted({b for b in (eff, *MICRO_BATCHES) if b <= eff and eff % b == 0}, reverse=True)
    table = load_expectations()
    if weights is None and _needs_weights(backbone):
        weights = "PATH"

    combos = [_Combo(m, dict(v), p) for m in methods for v in VARIANTS.get(m, ({},)) for p in precisions]
    order = {p: i for i, p in enumerate(PRECISIONS)}
    groups = []  # (sort key, combo, size, expected, expected_from)
    for ci, c in enumerate(combos):
        for s in sizes:
            acc, source = expected_accuracy(c.method, c.variant, c.precision, s, table)
            groups.append(((acc is None, -(acc or 0.0), order[c.precision], -s, ci), c, s, acc, source))
    groups.sort(key=lambda g: g[0])

    listed: list[Configuration] = []
    bar = tqdm(total=len(groups), desc="plan", unit="config", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    search = _Search(budget_mb, backbone, dataset, n_classes, weights, bar)
    try:
        with torch.random.fork_rng(devices=[]):  # random init of the candidates moves no caller's RNG
            # each combination's smallest configuration first (cheap, nothing measured): one whose lower
            # bound is over the budget is over it at every size and batch, and is never built again
            floor = {}
            for c in combos:
                built = search.build(c, sizes[-1], eff)
                if built is not None:
                    floor[c] = built.lower_bound(micros[-1])
                    if floor[c] > budget_mb:
                        c.over.append((sizes[-1], micros[-1]))
                del built
            for _, combo, size, acc, source in groups:
                bar.update()
                if len(listed) >= top:
                    break
                if combo.listed or combo.unsupported or all(combo.dominated(size, b) for b in micros):
                    continue
                built = search.build(combo, size, eff)
                if built is None:
                    continue
                found = search.largest_fit(combo, built, size, micros, eff)
                if found is None:
                    continue
                micro, peak = found
                ov = search.overrides(combo, size, micro, eff)
                notes = []
                if built.batch_norms and micro < eff:
                    notes.append(f"its train-mode batch norms normalise over micro-batches of {micro}, not {eff}: "
                                 "accumulation sums the gradients, not their statistics")
                if weights == "PATH":
                    notes.append(f"PATH: {backbone}'s checkpoint (no offline weights; repnet plan --weights FILE "
                                 "fills it in)")
                listed.append(Configuration(
                    combo.method, combo.precision, _placement(combo.method, combo.variant), dict(combo.variant),
                    size, micro, eff // micro, peak, built.analytic.total_mb(micro), acc, source, ov,
                    " ".join(shlex.quote(a) for a in ["repnet", "train", *train_arguments(ov)]), notes))
                combo.listed = True
            if not listed:
                raise RepnetError(_nothing_fits(search, floor, sizes[-1], micros[-1], eff))
    finally:
        bar.close()
    return {
        "budget_mb": budget_mb, "backbone": backbone, "dataset": dataset, "num_classes": n_classes,
        "effective_batch": eff, "methods": methods, "image_sizes": sizes, "precisions": precisions, "top": top,
        "peak": "measured: the live-tensor peak of one steady-state Adam training step at the micro-batch, less "
                "the input batch (repnet.memory.profile peak_mb, PyTorch's memory profiler, CPU); analytic: the "
                "papers' model (docs/memory.md: peak activation x batch + parameters, frozen at 1 B)",
        "configurations": [dataclasses.asdict(c) for c in listed],
        "expectation_source": {
            "file": f"src/repnet/training/{EXPECTATIONS.name}", "generated_by": table["command"], "what": table["what"],
            "method_rule": table["method_rule"], "resolution_rule": table["resolution"]["rule"],
            "benchmark_files": sorted({f for m in table["methods"].values() for f in m["files"]}
                                      | set(table["resolution"]["files"])
                                      | {f for p in table["precision"].values() for f in p.get("files", [])}
                                      | {f for o in table["options"].values() for v in o.values() for f in v["files"]}),
            "caveat": f"measured on {table['backbone']} at a reduced scale (1,000 training images, 2 epochs): the "
                      f"figures rank configurations; they are not a promise for {backbone} on {dataset}",
        },
        "measurements": search.log,
    }


def _nothing_fits(search: _Search, floor: dict, size: int, micro: int, eff: int) -> str:
    """The one line of a budget nothing fits: the smallest configuration measured. Each supported
    combination's smallest configuration (``floor``: its lower bound) is a candidate; they are
    measured in the order of their bounds until no bound left is under the smallest measured."""
    def smallest():
        return min((r for r in search.log if r["peak_mb"] is not None), key=lambda r: r["peak_mb"], default=None)

    best = smallest()
    for c, bound in sorted(floor.items(), key=lambda item: item[1]):
        if best is not None and best["peak_mb"] <= bound:
            break
        if describe(c.method, c.variant, c.precision, size, micro, eff // micro) in {r["configuration"]
                                                                                     for r in search.log}:
            continue
        search.measure(c, search.build(c, size, eff), size, micro, eff)
        best = smallest()
    where = (f"the smallest measured configuration is {best['configuration']} at {_fmt_mb(best['peak_mb'])} MB"
             if best is not None else "no configuration could be measured")
    return f"nothing fits in {_fmt_mb(search.budget)} MB: {where}"


# ----------------------------------------------------------------------------- output
_COLS = [("#", None), ("method", "method"), ("placement", "placement"), ("precision", "precision"),
         ("px", "image_size"), ("batch x accum", None), ("peak MB", "peak_mb"), ("analytic MB", "analytic_mb"),
         ("expected acc", "expected_accuracy")]


def format_plan(result: dict) -> str:
    """The table, where the expectation comes from, and the ``repnet train`` command of each row."""
    rows = []
    for i, c in enumerate(result["configurations"], 1):
        rows.append([str(i), c["method"], c["placement"], c["precision"], str(c["image_size"]),
                     f"{c['micro_batch']} x {c['accum_steps']}", f"{c['peak_mb']:.2f}", f"{c['analytic_mb']:.2f}",
                     "-" if c["expected_accuracy"] is None else f"{c['expected_accuracy']:.4f}"])
    heads = [h for h, _ in _COLS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    src = result["expectation_source"]
    lines = [f"{result['backbone']} -> {result['dataset']} ({result['num_classes']} classes) within "
             f"{_fmt_mb(result['budget_mb'])} MB, {result['effective_batch']} images per optimizer step; "
             f"{len(result['measurements'])} configurations measured",
             "peak MB: " + result["peak"], "",
             "  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines += ["", f"expected acc: from committed benchmark results ({', '.join(src['benchmark_files'])}), "
              f"summarised in {src['file']} by `{src['generated_by']}`: {src['method_rule']}; + a resolution offset "
              f"({src['resolution_rule']}); + precision and option offsets. {src['caveat'][0].upper()}"
              f"{src['caveat'][1:]}.", ""]
    for i, c in enumerate(result["configurations"], 1):
        lines.append(f"{i}: {c['command']}")
        lines += [f"   expected: {c['expected_from']}"] + [f"   note: {n}" for n in c["notes"]]
    return "\n".join(lines)
