"""``repnet train --runtime device``: the steps run in ``repnet-device``, the C++ trainer built from
``device/`` (``scripts/setup.sh`` builds it into ``build/device``; ``REPNET_DEVICE_BIN`` overrides).

The Python side prepares the run folder - the training program with its metadata
(:func:`~repnet.runtime.device.files.write_program`: the recipe's optimizer and schedule, the
parameter groups, the adapter config) and the packed train / test splits
(:func:`~repnet.runtime.device.files.write_dataset`) - then runs the C++ process and streams its
progress lines (one JSON object each) into the progress bar and ``log.jsonl``. The trainer's own
figures go to ``results.json``: step time, images/s, **process peak RSS** (getrusage in the C++
process), the program's arena and weights. At the end the adapter the C++ side wrote is reloaded in
eager PyTorch (``repnet.from_pretrained``) and scored on the test set beside the device's figure.

What the device does differently from eager training: the program runs in eval mode (frozen
statistics, no dropout) at one batch size; augmentation is horizontal flips only (when the recipe
flips), on preprocessed images; no validation split is scored. Resuming (``--resume``) continues from
the C++ checkpoint (``checkpoint.rdc``), bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from repnet.errors import RepnetError
from repnet.storage import (RunKind, atomic_write_text, check_resumable, claim_folder, clean_temps, set_run_state,
                            truncate_log)
from repnet.optim import CosineSchedule

__all__ = ["DEVICE_RUN", "find_binary", "run_device", "train_on_device", "prepare_run", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[4]
BINARY_ENV = "REPNET_DEVICE_BIN"
CHECKPOINT = "checkpoint.rdc"


def _verify(folder: Path) -> None:
    if not (folder / "program.json").is_file():
        raise RepnetError(f"--overwrite: {folder} does not hold a device training run; give a new or empty folder")


DEVICE_RUN = RunKind("device run", CHECKPOINT, ("config.yaml", "program.pte", "program.json", "train.rpd", "test.rpd",
                                                CHECKPOINT, "log.jsonl", "adapter", "results.json", "prepare.json"), _verify,
                     "repnet train --runtime device")


def find_binary() -> Path:
    """The ``repnet-device`` executable: ``$REPNET_DEVICE_BIN``, else ``build/device/repnet-device``."""
    env = os.environ.get(BINARY_ENV)
    path = Path(env) if env else REPO_ROOT / "build" / "device" / "repnet-device"
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = f"{BINARY_ENV}={env}" if env else str(path)
        raise RepnetError(f"the device trainer is not built ({where} missing): bash scripts/setup.sh builds it, "
                          f"or point {BINARY_ENV} at a repnet-device binary")
    return path


def run_device(args: list[str], on_event: Callable[[dict], None] | None = None, binary: Path | None = None,
               timeout: float | None = None, interrupt_hint: str = "") -> list[dict]:
    """Run ``repnet-device args``; every progress line (a JSON object) goes to ``on_event``; returns them
    all. A failure is one :class:`RepnetError` with the trainer's own line. Ctrl-C is passed on as SIGINT
    (the trainer finishes its step and checkpoints) and raised as :class:`~repnet.errors.Interrupted`."""
    import signal
    import tempfile

    from repnet.errors import Interrupted

    cmd = [str(binary or find_binary()), *map(str, args)]
    events: list[dict] = []
    with tempfile.TemporaryFile(mode="w+") as err_file, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True) as proc:
        try:
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                events.append(ev)
                if on_event is not None:
                    on_event(ev)
            proc.wait(timeout=timeout)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise Interrupted(f"interrupted; the device trainer checkpointed{interrupt_hint}") from None
        except BaseException:
            proc.kill()
            raise
        err_file.seek(0)
        err = err_file.read()
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {proc.returncode}"
        raise RepnetError(f"repnet-device: {msg.removeprefix('error: ')}")
    return events


# ----------------------------------------------------------------------------- the run
def prepare_run(cfg, run_dir: Path, ctx, name: str = "program", data_names=("train.rpd", "test.rpd")) -> dict:
    """Export the program + metadata (``<name>.pte`` / ``.json``) and pack the splits (``data_names``)
    into ``run_dir`` (``ctx``: a :class:`repnet.runtime.RunContext`); returns facts for results.json."""
    from repnet.runtime.device.files import flips_of, optimizer_spec, program_metadata, write_dataset, write_program
    from repnet.runtime.executorch.program import export_training_program

    say = ctx.say
    data_cfg = type(cfg)(**{**cfg.to_dict(), "augment": "none"})  # preprocessed once; flips on the device
    train_ds, _val, test_ds, num_classes, class_names = ctx.build_data(data_cfg)
    ctx.seed_everything(cfg.seed)
    model = ctx.build_model(cfg, num_classes).eval()
    _, total_steps = ctx.plan_steps(len(train_ds), cfg)
    say(f"exporting the device training program ({cfg.image_size}px, batch {cfg.batch_size}) ...")
    prog = export_training_program(model, cfg.batch_size, cfg.image_size, cfg.label_smoothing, evaluate=True,
                                   kernels=not cfg.portable)
    meta = program_metadata(model, prog, lr=cfg.lr, lr_side=cfg.lr_side, optimizer=optimizer_spec(cfg),
                            warmup_steps=CosineSchedule.for_run(total_steps, cfg.warmup_fraction).warmup_steps,
                            total_steps=total_steps, label_smoothing=cfg.label_smoothing, class_names=class_names,
                            mean=model.backbone.mean, std=model.backbone.std)
    meta["train"] = {"epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch, "max_steps": cfg.max_steps,
                     "seed": cfg.seed}
    write_program(run_dir, prog, meta, name=name)
    flips = flips_of(cfg)
    write_dataset(train_ds, run_dir / data_names[0], num_classes, hflip=flips)
    write_dataset(test_ds, run_dir / data_names[1], num_classes)
    trainable, total = model.param_counts()
    return {"num_classes": num_classes, "train_images": len(train_ds), "test_images": len(test_ds),
            "trainable_params": trainable, "total_params": total, "program_rewrites": prog.rewrites,
            "program_planned_mb": prog.planned_bytes / 1e6, "program_arena_mb": prog.arena_bytes / 1e6,
            "program_bytes": len(prog.buffer), "total_steps": total_steps, "hflip": flips}


def train_on_device(cfg, ctx, resume: str | None = None, overwrite: bool = False) -> dict:
    """``repnet train`` with ``cfg.runtime == "device"`` (see the module docstring; ``ctx``: a
    :class:`repnet.runtime.RunContext`); returns the results."""
    import yaml
    from tqdm.auto import tqdm

    from repnet.api import from_pretrained

    say, on_step = ctx.say, ctx.on_step
    t_start = time.time()
    run_dir = Path(resume if resume else cfg.out_dir or ctx.default_dir)
    binary = find_binary()  # before anything is written
    facts_path = run_dir / "program.json"
    if resume:
        check_resumable(run_dir, DEVICE_RUN)
        clean_temps(run_dir)
        for name in ("program.pte", "program.json", "train.rpd", "test.rpd"):
            if not (run_dir / name).is_file():
                raise RepnetError(f"cannot resume {run_dir}: {name} is missing")
        facts = json.loads((run_dir / "prepare.json").read_text()) if (run_dir / "prepare.json").is_file() \
            else {}
    else:
        claim_folder(run_dir, kind=DEVICE_RUN, overwrite=overwrite)
        cfg.out_dir = str(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        facts = prepare_run(cfg, run_dir, ctx)
        atomic_write_text(run_dir / "prepare.json", json.dumps(facts))
    log_path = run_dir / "log.jsonl"
    args = ["train", "--program", run_dir / "program.pte", "--train", run_dir / "train.rpd", "--test",
            run_dir / "test.rpd", "--out", run_dir, "--seed", cfg.seed, "--checkpoint-every", cfg.checkpoint_every]
    if resume:
        args.append("--resume")
    bar = None
    end: dict = {}

    def on_event(ev: dict) -> None:
        nonlocal bar
        kind = ev.get("event")
        if kind == "start" and resume:
            truncate_log(log_path, int(ev.get("epoch", 0)))
            say(f"resuming {run_dir} at step {ev.get('step', 0)}")
        elif kind == "plan":
            bar = tqdm(total=ev["total_steps"], desc="device", disable=not cfg.progress, dynamic_ncols=True,
                       leave=False, initial=0)
        elif kind == "step":
            if bar is not None:
                bar.n = ev["step"]
                bar.set_postfix(loss=f"{ev['loss']:.4f}", refresh=False)
                bar.refresh()
            if on_step is not None:
                on_step({"step": ev["step"], "epoch": ev["epoch"], "loss": ev["loss"], "model": None})
        elif kind == "epoch":
            rec = {"epoch": ev["epoch"], "step": ev["step"], "lr": ev["lr"], "train_loss": ev["train_loss"],
                   "train_accuracy": ev["train_accuracy"], "time_s": time.time() - t_start}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"epoch {ev['epoch']}/{cfg.epochs} step {ev['step']}: train loss {ev['train_loss']:.4f} "
                f"acc {ev['train_accuracy']:.4f}")
        elif kind in ("eval", "end"):
            end[kind] = ev

    try:
        run_device(args, on_event, binary=binary, interrupt_hint=f"; continue with: repnet train --resume {run_dir}")
    finally:
        if bar is not None:
            bar.close()
    test = end.get("eval", {})
    stats = end.get("end", {})
    # the adapter the device wrote, back in eager PyTorch
    model = from_pretrained(str(run_dir / "adapter"), pretrained=cfg.weights or True,
                            memory="vanilla")
    data_cfg = type(cfg)(**{**cfg.to_dict(), "augment": "none"})
    _, _, test_ds, num_classes, _ = ctx.build_data(data_cfg)
    eager = ctx.evaluate(model, test_ds, cfg)
    meta = json.loads(facts_path.read_text())
    results = {
        "final_test_accuracy": test.get("accuracy"), "test_accuracy": test.get("accuracy"),
        "final_test_loss": test.get("loss"), "final_val_accuracy": None, "best_val_accuracy": None,
        "best_val_epoch": None, "selected_on": "none",
        "eager_test_accuracy": eager["accuracy"],  # the reloaded adapter in eager PyTorch (train-mode-free forward)
        "method": cfg.method, "backbone": cfg.backbone, "dataset": cfg.dataset, "num_classes": num_classes,
        "train_images": facts.get("train_images"), "val_images": 0, "test_images": len(test_ds),
        "steps": stats.get("steps"), "epochs_run": stats.get("epoch"),
        "trainable_params": facts.get("trainable_params"), "total_params": facts.get("total_params"),
        "train_images_per_s": stats.get("images_per_s"), "train_time_s": stats.get("train_time_s"),
        "step_time_s": stats.get("step_time_s"), "peak_rss_mb": stats.get("peak_rss_mb"),
        "train_peak_rss_mb": stats.get("train_peak_rss_mb"),
        "program_arena_mb": stats.get("arena_mb"), "program_eval_arena_mb": stats.get("eval_arena_mb"),
        "program_weights_mb": stats.get("weights_mb"), "input_batch_mb": stats.get("input_batch_mb"),
        "program_planned_mb": meta["memory"]["planned_bytes"] / 1e6, "program_rewrites": meta.get("rewrites"),
        "optimizer": meta["optimizer"], "schedule": meta["schedule"], "hflip": facts.get("hflip"),
        "wall_time_s": time.time() - t_start, "device": "repnet-device (C++, ExecuTorch runtime)",
        "runtime": "device", "binary": str(binary),
        "config": cfg.to_dict(), "run_dir": str(run_dir), "adapter": str(run_dir / "adapter"),
    }
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    set_run_state(run_dir, DEVICE_RUN, "finished")
    say(f"test accuracy {results['test_accuracy']:.4f} on the device (eager reload {eager['accuracy']:.4f}); "
        f"peak RSS {results['peak_rss_mb']:.1f} MB; wrote {run_dir / 'results.json'} and {run_dir / 'adapter'}")
    return results
