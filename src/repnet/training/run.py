"""Training behind ``repnet train``: the paper's recipe (docs/recipes.md), resumable to the bit.

:func:`train` asks the runtime to refuse what it cannot do before the run folder is touched, claims
the folder, builds data and model from the config, trains through :func:`repnet.training.loop.fit` and
writes ``config.yaml``, ``log.jsonl``, ``checkpoint.pt`` (atomic, checksummed), ``results.json`` and
``adapter/``. The test set is evaluated once, at the end, and the final epoch is reported. Everything
random is a function of the seed or saved in the checkpoint, so a run killed at any moment and resumed
reaches the same weights, bit for bit on CPU. docs/training.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from repnet.training import loop
from repnet.config.schema import SESSION_KEYS, TrainConfig, coerce
from repnet.config.recipes import make_config, read_yaml, tunes
from repnet.config.build import build_data, build_model
from repnet.errors import Interrupted, NonFinite, RepnetError
from repnet.limits import WARN_LR
from repnet.training.loop import (all_finite, evaluate, make_loader, make_optimizer, plan_steps,
                                  resolve_device, schedule_of)
from repnet.training.loop import rng_state, seed_everything, set_rng_state
from repnet.storage import (RunKind, Spec, atomic_append_text, atomic_write_text, check_fields, check_resumable,
                            claim_folder, clean_temps, load_checkpoint, missing_root, read_json, read_safetensors,
                            release_claim, save_checkpoint, save_tensors, set_run_state, truncate_log)
from repnet.runtime import RunContext, get_runtime

__all__ = ["train", "resume_config", "read_results", "memory_profile", "MEMORY_KEYS", "TrainConfig", "make_config"]


#: What a ``repnet train`` checkpoint holds (checked after its checksum: :func:`repnet.storage.check_fields`).
CHECKPOINT_FIELDS = {
    "model": Spec(dict, values=torch.Tensor), "optimizer": Spec(dict, fields={"state": dict, "param_groups": list}),
    "scheduler": dict, "rng": Spec(dict, fields={"torch": torch.Tensor, "numpy": list, "python": tuple}),
    "backbone_fingerprint": str, "total_steps": Spec(int, low=1),
    "state": Spec(dict, fields={
        "epoch": Spec(int, low=0), "batch": Spec(int, low=0), "step": Spec(int, low=0), "images": Spec(int, low=0),
        "last_val": (float, None), "best_val": (float, None), "best_val_epoch": (int, None),
        "best_test": (float, None), "best_test_epoch": (int, None), "elapsed": float, "train_time": float,
        "epoch_stats": Spec(list, items=float)}),
}


#: A ``repnet train`` run folder (``overwrite=True`` replaces exactly these files, once the checkpoint is ours).
def _verify_run(folder: Path) -> None:
    """Raise unless ``folder/checkpoint.pt`` is a ``repnet train`` checkpoint (checksum and keys)."""
    try:
        load_checkpoint(folder / "checkpoint.pt", fields=CHECKPOINT_FIELDS)
    except RepnetError as e:
        raise RepnetError(f"--overwrite: {folder} does not hold a training run ({e}); give a new or empty "
                          "folder") from None


RUN = RunKind("run", "checkpoint.pt", ("config.yaml", "checkpoint.pt", "log.jsonl", "best.safetensors",
                                                "adapter", "results.json", "tune.json"), _verify_run, "repnet train",
              early=("config.yaml",))


def train(config: TrainConfig, resume: str | None = None, on_step: Callable[[dict], None] | None = None,
          overwrite: bool = False) -> dict:
    """Train ``config`` (or resume the run in folder ``resume``); returns the results dict.
    ``overwrite``: ``config.out_dir`` may hold an earlier run, which is replaced (nothing else).

    ``on_step(info)`` is called after every optimizer step with ``{"step", "epoch", "loss",
    "model"}`` (a hook for tests and notebooks; raising from it stops the run).

    Bad input found while the run is built (data, weights, options), before its first checkpoint,
    leaves no run folder behind (:func:`repnet.storage.release_claim`): the same command works once fixed.
    """
    claims: list = []  # (folder, what its creation created, the run's state once it trains)
    try:
        return _train(config, resume, on_step, overwrite, claims)
    except RepnetError as e:
        for folder, created, state in claims:  # (not after a step, a non-finite stop or Ctrl-C: those resume)
            untrained = not isinstance(e, (NonFinite, Interrupted)) and (state or {}).get("step", 0) == 0
            release_claim(folder, RUN, created, untrained_marker=untrained)
        raise


def _train(config: TrainConfig, resume: str | None, on_step, overwrite: bool, claims: list) -> dict:
    from repnet.backbones import BACKBONES
    from repnet.methods import METHODS

    cfg = config
    cfg.validate()
    METHODS.get(cfg.method)  # unknown names fail before any data is read
    BACKBONES.get(cfg.backbone)
    runtime = get_runtime(cfg.runtime)
    runtime.check(cfg, resume=bool(resume))  # what the runtime cannot do fails before the folder is touched
    t_start = time.time()
    say = print if cfg.progress else (lambda *a, **k: None)
    own = runtime.run(cfg, run_context(cfg, say, on_step), resume=resume, overwrite=overwrite)
    if own is not None:  # a runtime that runs the whole training itself (e.g. the C++ device trainer)
        return own

    # ---- the run folder: ours only
    run_dir = Path(resume if resume else cfg.out_dir or _default_run_dir(cfg))
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "log.jsonl"
    ckpt = None
    if resume:
        clean_temps(run_dir)
        if ckpt_path.is_file() or not (run_dir / "tune.json").is_file():
            check_resumable(run_dir, RUN)
            ckpt = load_checkpoint(ckpt_path, fields=CHECKPOINT_FIELDS)
        # else: stopped while tuning (tune.json holds the finished trials): tuning goes on, then the run starts
    else:
        claims.append((run_dir, missing_root(run_dir), None))
        claim_folder(run_dir, kind=RUN, overwrite=overwrite)
        cfg.out_dir = str(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    device = resolve_device(cfg.device)
    if max(cfg.lr, cfg.lr_side) > WARN_LR:  # (shown with --quiet too: it is not progress)
        print(f"warning: lr={cfg.lr:g} / lr_side={cfg.lr_side:g} are far above the recipes' 1e-4 .. 5e-2",
              file=sys.stderr)

    # ---- data and model (deterministic given the seed)
    train_ds, val_ds, test_ds, num_classes, class_names = build_data(cfg)
    tuned = None
    if tunes(cfg):  # the rate that matters, chosen on the validation split (resumable: tune.json)
        from repnet.training.tune import tune

        tuned = tune(cfg, train_ds, val_ds, num_classes, device, run_dir, say)
        cfg = dataclasses.replace(cfg, **{tuned["key"]: tuned["value"]})
    seed_everything(cfg.seed)
    model = build_model(cfg, num_classes).to(device)
    trainable, total = model.param_counts()
    optimizer = make_optimizer(model, cfg)
    n_train = len(train_ds)
    steps_per_epoch, total_steps = plan_steps(n_train, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(cfg, total_steps))
    trainer = runtime.trainer(model, cfg, schedule_of(cfg, total_steps), say)  # None: PyTorch's step (eager)
    if trainer is not None:
        scheduler = None
    st = loop.new_state()  # (``elapsed`` = wall time of earlier sessions; this session's is added when saving)
    claims[:] = [(folder, created, st) for folder, created, _ in claims]

    def checkpoint(state: dict) -> None:
        if not all_finite(model):
            raise NonFinite(f"weights became non-finite at epoch {state['epoch'] + 1} step {state['step']}; "
                              f"last good checkpoint: {ckpt_path}")
        save_checkpoint({
            "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {}, "rng": rng_state(),
            "state": {**state, "elapsed": state["elapsed"] + time.time() - t_start},
            "backbone_fingerprint": model.backbone.fingerprint, "total_steps": total_steps,
        }, ckpt_path)

    if ckpt is not None:
        if ckpt["backbone_fingerprint"] != model.backbone.fingerprint:
            raise RepnetError(f"cannot resume {run_dir}: the backbone weights differ from the ones it started with")
        if ckpt["total_steps"] != total_steps:
            raise RepnetError(f"cannot resume {run_dir}: the data or limits changed ({ckpt['total_steps']} "
                              f"total steps recorded, {total_steps} now)")
        missing = set(model.trainable_state_keys()) - set(ckpt["model"])
        if missing:
            raise RepnetError(f"cannot resume {run_dir}: checkpoint lacks {sorted(missing)[:3]}")
        own = model.state_dict()
        wrong = [k for k in model.trainable_state_keys() if tuple(ckpt["model"][k].shape) != tuple(own[k].shape)]
        if wrong:
            raise RepnetError(f"cannot resume {run_dir}: its checkpoint's {wrong[0]} has shape "
                              f"{tuple(ckpt['model'][wrong[0]].shape)}, this model's {tuple(own[wrong[0]].shape)}")
        try:
            model.load_state_dict(ckpt["model"], strict=False)
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RepnetError(f"cannot resume {run_dir}: its checkpoint does not fit this run ({first})") from None
        st.update(ckpt["state"])
        truncate_log(log_path, st["epoch"])
        say(f"resuming {run_dir} at epoch {st['epoch'] + 1}, step {st['step']}/{total_steps}")
        del ckpt
    else:
        checkpoint(st)  # a last good checkpoint exists from step 0 on
    elapsed_before = st["elapsed"]  # wall time of earlier sessions of this run

    images = total_steps * cfg.batch_size * cfg.accum_steps
    if device.type == "cpu" and images * cfg.image_size ** 2 > 2e10:  # ~1 h and more on 2 cores
        say(f"note: {total_steps:,d} steps at {cfg.image_size} px on the CPU take many hours (the paper's recipe is "
            "for a GPU); a quick run: --image-size 64 --epochs 1 --train-subset 1000 --test-subset 500")
    say(f"{cfg.method} on {cfg.backbone} -> {cfg.dataset} ({num_classes} classes): {n_train} train / "
        f"{len(val_ds) if val_ds is not None else 0} val / {len(test_ds)} test images, {cfg.image_size}px, "
        f"batch {cfg.batch_size}" + (f" x {cfg.accum_steps} accumulated" if cfg.accum_steps > 1 else "")
        + f", {total_steps} steps on {device}; trainable {trainable:,d} of {total:,d} params")

    def on_epoch(state: dict, rec: dict) -> None:
        if cfg.select_best_on == "val" and state["best_val_epoch"] == rec["epoch"]:
            save_tensors(model.trainable_state_dict(), run_dir / "best.safetensors")
        if cfg.select_best_on == "test":  # the released code's protocol: optimistic, opt-in only
            t = evaluate(model, make_loader(test_ds, cfg, device), device)
            rec.update(test_accuracy=t["accuracy"])  # selection on test: see results["note"]
            if state["best_test"] is None or t["accuracy"] > state["best_test"]:
                state["best_test"], state["best_test_epoch"] = t["accuracy"], rec["epoch"]
                save_tensors(model.trainable_state_dict(), run_dir / "best.safetensors")
        rec["time_s"] = elapsed_before + time.time() - t_start
        atomic_append_text(log_path, json.dumps(rec) + "\n")

    loop.fit(model, train_ds, cfg, device, optimizer, scheduler=scheduler, state=st, val_ds=val_ds,
             checkpoint=checkpoint, on_step=on_step, on_epoch=on_epoch, step=trainer.step if trainer else None,
             stop_hint=f"; last good checkpoint: {ckpt_path}", resume_hint=f"; continue with: repnet train --resume {run_dir}")

    # ---- the end: the test set, once
    test_loader = make_loader(test_ds, cfg, device)
    final = evaluate(model, test_loader, device, progress=cfg.progress, desc="test")
    results = {
        "final_test_accuracy": final["accuracy"],
        "test_accuracy": final["accuracy"],
        "final_test_loss": final["loss"],
        "final_val_accuracy": st["last_val"],
        "best_val_accuracy": st["best_val"],
        "best_val_epoch": st["best_val_epoch"],
        "selected_on": cfg.select_best_on,
    }
    if cfg.select_best_on != "none":
        best = read_safetensors(run_dir / "best.safetensors", "best weights", require_digest=True)
        model.load_state_dict(best, strict=False)
        selected = evaluate(model, test_loader, device)
        results["test_accuracy"] = selected["accuracy"]
        results["selected_epoch"] = st["best_val_epoch"] if cfg.select_best_on == "val" else st["best_test_epoch"]
        if cfg.select_best_on == "test":
            results["note"] = "test_accuracy is the best epoch ON THE TEST SET (optimistic; the released code's protocol)"
    if not all_finite(model):
        raise NonFinite(f"the trained weights are non-finite; nothing was written as the result (last good "
                        f"checkpoint: {ckpt_path})")
    model.save_pretrained(str(run_dir / "adapter"))
    results.update({
        "method": cfg.method, "backbone": cfg.backbone, "dataset": cfg.dataset, "num_classes": num_classes,
        "train_images": n_train, "val_images": len(val_ds) if val_ds is not None else 0, "test_images": len(test_ds),
        "steps": st["step"], "epochs_run": st["epoch"],
        "trainable_params": trainable, "total_params": total,
        "train_images_per_s": st["images"] / max(st["train_time"], 1e-9),
        "train_time_s": st["train_time"],
        "wall_time_s": elapsed_before + time.time() - t_start,
        "device": str(device), "runtime": cfg.runtime,
    })
    if trainer is not None:
        results.update(trainer.results())
    if tuned is not None:
        results["tune"] = tuned
    if cfg.profile_memory:
        try:
            results.update(memory_profile(cfg, num_classes, device))
        except Exception as e:  # noqa: BLE001 - a failed measurement must not lose a finished run
            results.update({k: None for k in MEMORY_KEYS})
            results["memory_profile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            print(f"warning: memory profile failed ({results['memory_profile_error']}); figures left empty")
    results["config"] = cfg.to_dict()
    results["run_dir"] = str(run_dir)
    results["adapter"] = str(run_dir / "adapter")
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    set_run_state(run_dir, RUN, "finished")
    say(f"test accuracy {results['test_accuracy']:.4f} (final epoch {final['accuracy']:.4f}"
        + (f", best val {st['best_val']:.4f} at epoch {st['best_val_epoch']}" if st["best_val"] is not None else "")
        + f"); wrote {run_dir / 'results.json'} and {run_dir / 'adapter'}")
    return results


def run_context(cfg: TrainConfig, say: Callable[[str], None] = print, on_step=None) -> RunContext:
    """What a runtime that runs whole trainings is given (:class:`repnet.runtime.RunContext`)."""

    def evaluate_on(model, ds, c):
        device = resolve_device(c.device)
        return evaluate(model.to(device), make_loader(ds, c, device), device)

    return RunContext(build_data=build_data, build_model=build_model, plan_steps=plan_steps,
                      seed_everything=seed_everything, evaluate=evaluate_on, say=say, on_step=on_step,
                      default_dir=_default_run_dir(cfg))


#: What a run's ``results.json`` holds that other commands read back (``repnet reproduce --collect``).
RESULTS_FIELDS = {"test_accuracy": Spec(float, low=0, high=1), "final_test_accuracy": Spec(float, low=0, high=1),
                  "method": str, "backbone": str, "dataset": str, "config": dict,
                  "analytic_mb": Spec(float, None, required=False)}


def read_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a finished run, its structure checked (one line if it is not a run's results)."""
    path = Path(run_dir) / "results.json"
    return check_fields(read_json(path, "results"), RESULTS_FIELDS, f"results {path}")


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> TrainConfig:
    """The config of the run in ``run_dir``, with only runtime keys (device, workers, ...) changed."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise RepnetError(f"cannot resume: {run_dir} has no config.yaml")
    base = {k: coerce(k, v) for k, v in read_yaml(cfg_path).items()}
    overrides = {k: coerce(k, v) for k, v in (overrides or {}).items()}
    if "options" in overrides:
        overrides["options"] = {**base.get("options", {}), **overrides["options"]}
    fixed = [k for k, v in overrides.items() if k not in SESSION_KEYS and v != base.get(k)]
    if fixed:
        raise RepnetError(f"cannot change {', '.join(fixed)} when resuming (only {', '.join(SESSION_KEYS)})")
    cfg = TrainConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


MEMORY_KEYS = ("analytic_mb", "analytic_saved_mb", "measured_saved_mb", "peak_mb")


def memory_profile(cfg: TrainConfig, num_classes: int, device: torch.device) -> dict:
    """The memory figures of this configuration (repnet.memory.profile), on a fresh model so the
    trained one is untouched."""
    from repnet.memory import profile

    error = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(cfg, num_classes, pretrained=False).to(device)
        try:
            rec = profile(model, batch_size=cfg.batch_size, image_size=cfg.image_size)
        except Exception as e:  # noqa: BLE001 - keep the analytic / kept figures if the peak run fails
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            rec = profile(model, batch_size=cfg.batch_size, image_size=cfg.image_size, peak=False)
    out = {k: rec.get(k) for k in MEMORY_KEYS}
    out["memory_batch_size"] = cfg.batch_size
    out["peak_kind"] = rec.get("peak_kind")
    if error:
        out["memory_profile_error"] = f"peak measurement failed: {error}"
    return out


def _default_run_dir(cfg: TrainConfig) -> str:
    ds = cfg.dataset.replace(":", "_").replace("/", "_")
    return os.path.join("runs", f"{ds}-{cfg.backbone.replace(':', '_')}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
