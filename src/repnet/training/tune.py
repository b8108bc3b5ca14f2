"""Learning rates chosen on the validation split (``repnet train --tune``).

Before the run, one short seeded trial per value of the rate that matters for the method - the side
modules' ``lr_side`` where the method has side modules (Rep-Net, TinyTL-L+B, ...), else the head's
``lr`` - each trial ``tune_fraction`` of the run's steps with its own cosine schedule, scored on the
validation split only (never the test set). A trial whose loss or weights become non-finite is
recorded and skipped; the lowest validation loss wins. Trials are written to ``tune.json`` in the run folder as they finish, so an
interrupted tuning resumes where it stopped; the chosen value then trains the run. docs/recipes.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from repnet.errors import NonFinite, RepnetError
from repnet.storage import Spec, atomic_write_text, check_fields, read_json

#: The values each tunable rate is tried at: the papers' range of ``lr_p`` (1e-4 .. 3e-3) and a step
#: beyond for the side modules; half a decade around the recipes' head rates for ``lr``.
GRIDS: dict[str, tuple[float, ...]] = {"lr_side": (3e-4, 1e-3, 3e-3, 1e-2), "lr": (1e-4, 3e-4, 1e-3, 3e-3)}
STATE_FILE = "tune.json"
#: What :data:`STATE_FILE` holds, checked when an interrupted tuning resumes.
STATE_FIELDS = {"key": Spec(str, choices=tuple(GRIDS)), "steps_per_trial": Spec(int, low=1),
                "trials": Spec(list, items=Spec(dict, fields={"value": Spec(float, low=0), "diverged": bool,
                                                              "val_accuracy": (float, None),
                                                              "val_loss": (float, None)}))}


def tuned_key(model) -> str:
    """``lr_side`` when the model has trainable side modules, else ``lr``."""
    side = any(p.requires_grad for m in model.side_modules() for p in m.parameters())
    return "lr_side" if side else "lr"


def trial_steps(total_steps: int, fraction: float) -> int:
    """Optimizer steps of one trial: ``fraction`` of the run's, at least one."""
    return max(1, round(fraction * total_steps))


def read_state(path: Path, key: str, steps: int) -> list[dict]:
    """Trials an earlier session of this run finished (same rate, same trial length)."""
    if not path.is_file():
        return []
    prev = check_fields(read_json(path, "tuning state"), STATE_FIELDS, f"tuning state {path}")
    if not (prev["key"] == key and prev["steps_per_trial"] == steps):
        raise RepnetError(f"{path} belongs to another tuning (rate or trial length differ): start a new run")
    if any(not t["diverged"] and (t["val_accuracy"] is None or t["val_loss"] is None) for t in prev["trials"]):
        raise RepnetError(f"tuning state {path} is malformed: a finished trial without its validation figures")
    return prev["trials"]


def choose(trials: list[dict], default: float) -> float:
    """The value with the lowest validation loss (cross-entropy: a smoother score than the accuracy of a
    small split, where one image is a point); ties go to the better accuracy, then to the recipe's value.
    Every trial diverged: the recipe's value is kept."""
    ok = [t for t in trials if not t["diverged"]]
    if not ok:
        return default
    best = min(ok, key=lambda t: (t["val_loss"], -t["val_accuracy"], t["value"] != default, t["value"]))
    return best["value"]


def tune(cfg, train_ds, val_ds, num_classes: int, device: torch.device, run_dir: Path | None,
         say: Callable[[str], None] = print) -> dict:
    """Run the trials of ``cfg`` (a :class:`~repnet.config.schema.TrainConfig`) and return the record
    ``{"key", "value", "default", "trials", "steps_per_trial", "fraction", "time_s"}`` (``value``: the choice)."""
    from repnet.config.build import build_model
    from repnet.training import loop

    if val_ds is None or len(val_ds) == 0:
        raise RepnetError("--tune chooses on the validation split: give val_fraction > 0")
    if cfg.optimizer not in ("adam", "adamw"):
        raise RepnetError(f"--tune searches Adam's learning rates; it does not apply to --optimizer {cfg.optimizer}")
    t0 = time.time()
    _, total_steps = loop.plan_steps(len(train_ds), cfg)
    steps = trial_steps(total_steps, cfg.tune_fraction)
    loop.seed_everything(cfg.seed)
    probe = build_model(cfg, num_classes, pretrained=False)
    key = tuned_key(probe)
    del probe
    default = getattr(cfg, key)
    grid = GRIDS[key]
    path = Path(run_dir) / STATE_FILE if run_dir is not None else None
    trials = read_state(path, key, steps) if path is not None else []
    done = {t["value"] for t in trials}
    trial_cfg = dataclasses.replace(cfg, max_steps=steps, checkpoint_every=0, progress=False)
    val_loader = loop.make_loader(val_ds, cfg, device)
    for value in grid:
        if value in done:
            continue
        tc = dataclasses.replace(trial_cfg, **{key: value})
        rng = loop.rng_state()
        loop.seed_everything(cfg.seed)  # every trial starts where the run will: same init, same data order
        model = build_model(tc, num_classes).to(device)
        optimizer = loop.make_optimizer(model, tc)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, loop.schedule_of(tc, steps))
        t1 = time.time()
        record = {"value": value, "diverged": False}
        try:
            loop.fit(model, train_ds, tc, device, optimizer, scheduler=scheduler, name=f"tune {key}={value:g}")
            if not loop.all_finite(model):
                raise NonFinite("weights became non-finite")
            v = loop.evaluate(model, val_loader, device)
            if not math.isfinite(v["loss"]):
                raise NonFinite("validation loss became non-finite")
            record.update(val_accuracy=v["accuracy"], val_loss=v["loss"])
        except NonFinite as e:
            record.update(diverged=True, val_accuracy=None, val_loss=None, why=str(e))
        record["time_s"] = time.time() - t1
        loop.set_rng_state(rng)
        trials.append(record)
        say(f"tune {key}={value:g}: " + ("diverged (non-finite); skipped" if record["diverged"] else
                                        f"val acc {record['val_accuracy']:.4f}, val loss {record['val_loss']:.4f}")
            + f" ({steps} steps, {record['time_s']:.0f} s)")
        if path is not None:
            atomic_write_text(path, json.dumps({"key": key, "steps_per_trial": steps, "trials": trials}, indent=2))
        del model, optimizer
    chosen = choose([t for t in trials if t["value"] in grid], default)
    say(f"tune: {key} = {chosen:g} (validation split; recipe's {default:g})")
    return {"key": key, "value": chosen, "default": default, "trials": trials, "steps_per_trial": steps,
            "fraction": cfg.tune_fraction, "grid": list(grid), "time_s": time.time() - t0}
