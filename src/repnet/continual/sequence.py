"""``repnet continual``: tasks trained one after another on one shared backbone, each with the
``repnet train`` recipe of its dataset, every task seen so far evaluated after each; resumable after
the last finished task, bit for bit.

:func:`train_sequence` writes ``results.json`` (the accuracy matrix, average accuracy, backward
transfer, forgetting, per-task parameters and bytes, the storage against one fine-tuned network per
task); a continual driver (:mod:`repnet.continual.methods`) decides per task what trains.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
import torch
from repnet.training import loop
from repnet.errors import RepnetError
from repnet.methods import METHODS, parse_options
from repnet.storage import (RunKind, Spec, atomic_write_text, check_fields, check_resumable, claim_folder,
                            missing_root, read_json, read_safetensors, release_claim, set_run_state, save_tensors)
from repnet.continual.methods import CONTINUAL_METHODS
from repnet.continual.metrics import continual_metrics, format_matrix
from repnet.continual.model import FORMAT, MultiTaskModel, tensor_bytes
from repnet.config.build import int8_settings
from repnet.config.schema import SESSION_KEYS


# ----------------------------------------------------------------------------- training driver
def parse_tasks(tasks) -> list[tuple[str, str]]:
    """``"digits,fashion_mnist"`` or a list; an entry is ``dataset`` or ``name=dataset`` -> (name, dataset)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    out = []
    for t in tasks:
        name, sep, ds = str(t).strip().partition("=")
        if not sep:
            ds = name
            name = re.sub(r"[^A-Za-z0-9_]", "_", ds)
        if not name or not ds:
            raise RepnetError(f"--tasks: empty task in {','.join(map(str, tasks))!r}")
        out.append((name, ds))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RepnetError(f"duplicate task name '{dup[0]}' in --tasks (name them: a={dup[0]},b={dup[0]})")
    if not out:
        raise RepnetError("--tasks: give at least one dataset")
    return out


def train_sequence(tasks, backbone: str = "mobilenet_v2", method: str = "repnet", naive: bool = False,
                   out_dir: str | os.PathLike | None = None, options: dict | None = None, resume: bool = False,
                   overwrite: bool = False, **overrides) -> dict:
    claims: list = []
    try:
        return _train_sequence(tasks, backbone, method, naive, out_dir, options, resume, overwrite, claims,
                               **overrides)
    except RepnetError:  # bad input found before the first task finished: no run folder is left behind
        for folder, created in claims:
            release_claim(folder, RUN, created)
        raise


def _train_sequence(tasks, backbone: str, method: str, naive: bool, out_dir, options: dict | None, resume: bool,
                    overwrite: bool, claims: list, **overrides) -> dict:
    """Train ``tasks`` (datasets, or ``name=dataset``) one after another on one shared backbone.

    Each task gets ``method`` (its own side modules + head; ``naive``: in-place sequential
    fine-tuning of backbone tensors instead) and is trained with that dataset's ``repnet train``
    recipe (``TrainConfig``; ``overrides`` = any of its keys, e.g. ``epochs=2, image_size=64,
    train_subset=1000``). The validation split defaults to none (``val_fraction=0``): nothing is
    selected, the final epoch is what is evaluated. After each task every task seen so far is
    evaluated on its test split. Writes ``OUT/results.json`` (after every task, atomically) and
    ``OUT/model/`` (:meth:`MultiTaskModel.save`); returns the results dict.

    ``resume=True`` continues an interrupted sequence in ``out_dir`` after its last finished
    task (same tasks and settings): each task starts from its own seed, so the result is the
    one an uninterrupted run gives, bit for bit. A task cut off midway is trained again.
    """
    from repnet.config.build import build_data
    from repnet.config.recipes import make_config
    from repnet.training.loop import (evaluate, make_loader, make_optimizer, plan_steps,
                                      resolve_device, schedule_of, seed_everything)

    pairs = parse_tasks(tasks)
    overrides = {"val_fraction": 0.0, **overrides}
    for bad in ("dataset", "method", "backbone", "options", "out_dir"):
        if bad in overrides:
            raise RepnetError(f"train_sequence: '{bad}' is not a per-run override here")
    if overrides.get("select_best_on", "none") != "none":
        raise RepnetError("continual runs report the final epoch of each task (select_best_on=none)")
    cfgs = [make_config({**overrides, "dataset": ds, "backbone": backbone, "method": method,
                         "options": dict(options or {})}) for _, ds in pairs]
    base = cfgs[0]
    driver_cls, driver_options, task_method, task_options = None, None, method, dict(base.options)
    if method in CONTINUAL_METHODS:  # a method that decides per task what trains (e.g. hyblearn)
        driver_cls = CONTINUAL_METHODS.get(method)
        driver_options = parse_options(driver_cls.Options, base.options, method)
        task_method, task_options = driver_cls.task_model(driver_options, base, naive)
    else:
        METHODS.get(method)
    device = resolve_device(base.device)
    say = print if base.progress else (lambda *a, **k: None)
    if resume and not out_dir:
        raise RepnetError("resuming a continual run needs its folder (--out)")
    out = Path(out_dir or os.path.join("runs", f"continual-{backbone}-{method}{'-naive' if naive else ''}-"
                                                f"{time.strftime('%Y%m%d-%H%M%S')}"))
    previous = None
    if resume:
        previous = _resumable(out, pairs, cfgs, backbone, method, naive)
    else:
        claims.append((out, missing_root(out)))
        claim_folder(out, kind=RUN, overwrite=overwrite)

    pretrained = False if base.random_init else (base.weights or True)
    seed_everything(base.seed)
    int8 = int8_settings(base)
    if previous is not None:
        model = MultiTaskModel.load(out / "model", pretrained=pretrained, memory=base.memory)
    else:
        model = MultiTaskModel(backbone, base.image_size, pretrained=pretrained, memory=base.memory,
                               naive=naive or driver_cls is not None, int8=int8)
    model.to(device)
    model.check_method(task_method, **task_options)  # refuse a method before any data is read
    driver = None
    if driver_cls is not None:
        driver = driver_cls(driver_options, model.backbone)
        if previous is not None:
            state = out / str(previous.get("state_file"))
            driver.load_state(read_safetensors(state, f"{method} state", require_digest=True), str(state))

    data = {}
    for (name, ds), cfg in zip(pairs, cfgs):
        train_ds, _, test_ds, num_classes, _ = build_data(cfg, model.backbone.mean, model.backbone.std)
        data[name] = (train_ds, test_ds, num_classes)

    acc: list[list[float | None]] = []
    per_task: list[dict] = []
    results: dict = {}
    t_run = time.time()
    done = 0
    if previous is not None:
        acc, per_task, done = previous["acc"], previous["per_task"], len(previous["tasks"])
        t_run -= previous["wall_time_s"]
        say(f"resuming {out}: {done} of {len(pairs)} tasks done ({', '.join(previous['tasks'])})")
    for i, ((name, ds), cfg) in enumerate(zip(pairs, cfgs)):
        if i < done:
            continue
        train_ds, test_ds, num_classes = data[name]
        seed_everything(cfg.seed + i)
        tm = model.add_task(name, num_classes, task_method, **task_options)
        record = {}
        if driver is not None:
            record = driver.before_task(tm, train_ds, cfg, device, seed=cfg.seed + i, name=f"task '{name}'")
            say("  " + driver.summary(record))
        params = model.trainable_parameters(name)
        optimizer = make_optimizer(tm, cfg)
        steps_per_epoch, total_steps = plan_steps(len(train_ds), cfg, f"task '{name}': ")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(cfg, total_steps))
        say(f"task {i + 1}/{len(pairs)} '{name}' ({ds}, {num_classes} classes): {method}{' (naive)' if naive else ''} "
            f"on {backbone}, {len(train_ds)} train / {len(test_ds)} test images, {cfg.image_size}px, "
            f"{total_steps} steps on {device}; trainable {sum(p.numel() for p in params):,d} params")
        model.set_task(name)
        t0 = time.time()
        st = loop.fit(model, train_ds, cfg, device, optimizer, scheduler=scheduler, seed=cfg.seed + i,
                      name=f"task '{name}'")
        step, images = st["step"], st["images"]
        train_time = time.time() - t0
        if driver is not None:
            record.update(driver.after_task(tm))
        model.eval()
        row = []
        for j, (other, _) in enumerate(pairs[: i + 1]):
            r = evaluate(model[other], make_loader(data[other][1], cfgs[j], device), device,
                         progress=cfg.progress, desc=f"test {other}")
            row.append(r["accuracy"])
        acc.append(row + [None] * (len(pairs) - i - 1))
        say(f"  after '{name}': " + ", ".join(f"{t} {a:.4f}" for (t, _), a in zip(pairs, row)))
        per_task.append({"name": name, "dataset": ds, "num_classes": num_classes, "train_images": len(train_ds),
                         "test_images": len(test_ds), "steps": step, "train_time_s": train_time,
                         "train_images_per_s": images / max(train_time, 1e-9),
                         "trainable_params": sum(p.numel() for p in params),
                         "lr": cfg.lr, "lr_side": cfg.lr_side, "label_smoothing": cfg.label_smoothing,
                         **({method: record} if driver is not None else {})})
        model.save(out / "model")
        state_file = f"{method}-state-{i + 1}.safetensors"
        if driver is not None:  # one file per finished task: results.json names the one that fits it
            save_tensors(driver.state(), out / state_file)
        storage = model.storage()
        for rec in per_task:
            rec["adapter_bytes"] = storage["task_bytes"][rec["name"]]
        if naive or driver is not None:
            storage["trained_backbone_bytes"] = tensor_bytes(
                model.backbone.state_dict()[k[len("backbone."):]] for k in model.backbone_state_keys())
        square = [[a for a in r[: k + 1]] for k, r in enumerate(acc)]
        results = {
            "backbone": backbone, "method": method, "naive": naive,
            "policy": "naive sequential fine-tuning (shared backbone tensors train in place)" if naive
            else driver.policy if driver is not None
            else "frozen shared backbone, per-task trainable parts",
            **({method: dataclasses.asdict(driver_options), "state_file": state_file} if driver is not None else {}),
            "tasks": [n for n, _ in pairs[: i + 1]],
            "acc": acc[: i + 1], **continual_metrics(square),
            "per_task": per_task, "storage": storage,
            "backbone_fingerprint": model.backbone.fingerprint,
            "image_size": base.image_size, "epochs": base.epochs, "batch_size": base.batch_size,
            "device": str(device), "wall_time_s": time.time() - t_run,
            "configs": [c.to_dict() for c in cfgs[: i + 1]], "model": str(out / "model"),
            "complete": i == len(pairs) - 1,
        }
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        for old in out.glob("*-state-*.safetensors"):
            if old.name != results.get("state_file"):
                old.unlink()
    set_run_state(out, RUN, "finished")
    print(format_matrix(results))  # the result itself: printed even with --quiet
    say(f"wrote {out / 'results.json'} and {out / 'model'}")
    return results


#: What a continual run's ``results.json`` holds (what ``--resume`` reads back), checked field by field.
RESULTS_FIELDS = {
    "backbone": str, "method": str, "naive": bool, "policy": str, "complete": bool, "wall_time_s": float,
    "tasks": Spec(list, items=str), "acc": Spec(list, items=Spec(list, items=(float, None))),
    "per_task": Spec(list, items=Spec(dict, fields={"name": str})), "configs": Spec(list, items=dict),
    "state_file": Spec(str, required=False),
}


def read_results(out: Path) -> dict:
    """The ``results.json`` of the continual run in ``out``, its structure checked (one line if it is not one)."""
    path = out / "results.json"
    prev = check_fields(read_json(path, "continual results"), RESULTS_FIELDS, f"continual results {path}")
    n = len(prev["tasks"])
    if not (len(prev["acc"]) == len(prev["per_task"]) == len(prev["configs"]) == n) \
            or ("state_file" in prev and Path(prev["state_file"]).name != prev["state_file"]):
        raise RepnetError(f"continual results {path} is malformed: its tasks, accuracies, records and configs "
                          "do not match")
    return prev


def _verify_run(out: Path) -> None:
    """Raise unless ``out`` holds a continual run of ours: its results and a saved multi-task model."""
    cfg_file = out / "model" / "config.json"
    try:
        read_results(out)
        cfg = read_json(cfg_file, "multi-task config")
    except RepnetError as e:
        raise RepnetError(f"--overwrite: {out} does not hold a continual run ({e}); give a new or empty "
                          "folder") from None
    if not (isinstance(cfg, dict) and cfg.get("format") == FORMAT):
        raise RepnetError(f"--overwrite: {out} does not hold a continual run; give a new or empty folder")


#: A continual run folder (``overwrite=True`` replaces exactly these files, once verified as ours).
RUN = RunKind("continual run", "results.json", ("results.json", "model", "*-state-*.safetensors"), _verify_run,
              "repnet continual")


def _resumable(out: Path, pairs, cfgs, backbone: str, method: str, naive: bool) -> dict:
    """The earlier results of the run in ``out``, checked against what is asked now."""
    check_resumable(out, RUN)
    if not (out / "model" / "config.json").is_file():
        raise RepnetError(f"cannot resume: {out} holds no continual run (results.json and model/)")
    prev = read_results(out)
    if prev["complete"]:
        raise RepnetError(f"{out} is complete: nothing to resume")
    names = [n for n, _ in pairs]
    same = (prev["backbone"], prev["method"], prev["naive"]) == (backbone, method, naive)
    if not same or prev["tasks"] != names[: len(prev["tasks"])]:
        raise RepnetError(f"cannot resume {out}: it is {prev['method']}{' (naive)' if prev['naive'] else ''} on "
                          f"{prev['backbone']} with tasks {','.join(prev['tasks'])}, not this sequence")
    for old, new in zip(prev["configs"], cfgs):
        changed = sorted(k for k, v in new.to_dict().items() if k not in SESSION_KEYS and old.get(k) != v)
        if changed:
            raise RepnetError(f"cannot resume {out}: settings changed ({', '.join(changed)})")
    return prev
