"""Federated learning of adapters: FedAvg over what the method trains, one frozen backbone.

Every client holds the same frozen backbone (it never travels). Each round the server sends
the global *trainable state* (``model.trainable_state_dict()``: the method's modules, the head,
and any tensor the method changes), every client trains it for ``local_epochs`` on its own
shard, and the server replaces the global state by the average of the clients' states, each
weighted by its number of training images (McMahan et al., 2017). With Rep-Net that is a few
hundred thousand numbers per message instead of the whole network: the figures below are
counted from the tensors actually exchanged.

* Shards: ``iid`` (a seeded shuffle cut into equal parts) or ``dirichlet:ALPHA`` (per class,
  the images are divided among clients in proportions drawn from Dirichlet(ALPHA); small
  ALPHA = each client sees few classes). Every training image goes to exactly one client.
* Local training: :func:`repnet.loop.fit` (the one training loop) with the config's optimizer
  (Adam by default; ``optimizer``, ``weight_decay``) over the method's two parameter groups
  (``lr`` / ``lr_side``), a fresh optimizer each round (no optimizer state travels), label
  smoothing from the recipe, no learning-rate schedule; client ``k``'s data order in round ``r``
  is seeded by ``(seed, r, k)``.
* Integer buffers (e.g. ``num_batches_tracked``) are summed counters, not averaged: the
  server keeps the largest.
* ``--set int8=true``: every client trains the side network in INT8 (``repnet.int8``). With
  ``int8_master=int8`` the clients' weights lie on their int8 grids; their average need not,
  and is put back on the grid by the next local step.

    repnet federated --dataset digits --clients 4 --rounds 5 --partition dirichlet:0.5
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from . import loop

from .errors import RepnetError
from .storage import RunKind, atomic_write_text, claim_folder, clean_temps, load_checkpoint, save_checkpoint

__all__ = ["partition", "fedavg_states", "state_bytes", "run_federated"]


def partition(targets, clients: int, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Disjoint index sets, one per client, covering ``range(len(targets))``."""
    targets = np.asarray(targets)
    n = len(targets)
    if clients < 1:
        raise RepnetError(f"clients must be >= 1, got {clients}")
    if clients > n:
        raise RepnetError(f"{clients} clients for {n} training images: fewer clients or more data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    if scheme.startswith("dirichlet:"):
        try:
            alpha = float(scheme.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise RepnetError(f"partition '{scheme}': ALPHA in dirichlet:ALPHA must be a number > 0")
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].extend(piece.tolist())
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RepnetError(f"unknown partition '{scheme}'; use iid or dirichlet:ALPHA")


def fedavg_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of floating tensors; integer tensors take the element-wise maximum."""
    if not states or len(states) != len(weights):
        raise RepnetError("fedavg needs one weight per client state")
    total = float(sum(weights))
    out = {}
    for key in states[0]:
        ts = [s[key] for s in states]
        if ts[0].is_floating_point():
            acc = torch.zeros_like(ts[0], dtype=torch.float64)
            for t, w in zip(ts, weights):
                acc += t.double() * (w / total)
            out[key] = acc.to(ts[0].dtype)
        else:
            out[key] = torch.stack(ts).amax(0)
    return out


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _local_train(model, shard_ds, cfg, device, seed: int) -> float:
    """One client's local training (``cfg.epochs`` = the local epochs) through the one loop, a
    fresh optimizer and no schedule; returns the mean training loss."""
    losses: list[float] = []
    loop.fit(model, shard_ds, cfg, device, loop.make_optimizer(model, cfg), seed=seed,
             on_epoch=lambda state, rec: losses.append(rec["train_loss"]), name="local training",
             stop_hint="; lower --lr / --lr-side")
    return float(np.mean(losses)) if losses else float("nan")


#: A federated run folder (``overwrite=True`` replaces exactly these files, once the checkpoint is ours).
RUN = RunKind("federated run", "checkpoint.pt", ("checkpoint.pt", "adapter", "results.json"),
              lambda folder: load_checkpoint(folder / "checkpoint.pt"))


def run_federated(overrides: dict, clients: int = 4, rounds: int = 5, local_epochs: int = 1,
                  scheme: str = "iid", out_dir: str | None = None, progress: bool = True, resume: bool = False,
                  on_round=None, overwrite: bool = False) -> dict:
    """FedAvg of ``method``'s trainable state over ``clients`` shards of the dataset.

    ``overrides`` are training config keys (``repnet.training.make_config``): dataset,
    backbone, method, options, image_size, batch_size, lr, lr_side, train_subset, seed, ...
    With ``out_dir``: a checkpoint after every round (atomic), ``results.json`` (per-round test
    accuracy, bytes exchanged) and the final adapter at the end. ``resume=True`` continues the
    run in ``out_dir`` from its last round, bit-identically (same settings; ``rounds`` may grow).
    ``on_round(round)`` is called after each round's checkpoint (a hook for tests).
    """
    from tqdm.auto import tqdm

    from .config import build_data, build_model, make_config
    from .loop import evaluate, make_loader, mix_seed, resolve_device, rng_state, seed_everything, set_rng_state

    if rounds < 1 or local_epochs < 1:
        raise RepnetError("rounds and local_epochs must be >= 1")
    cfg = make_config(overrides)
    settings = {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "workers", "device")},
                "clients": clients, "local_epochs": local_epochs, "partition": scheme}
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir else None
    ckpt = None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise RepnetError(f"cannot resume: no checkpoint.pt in {out_dir}")
        clean_temps(ckpt_path.parent)
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["settings"] != settings:
            changed = sorted(k for k in settings if settings[k] != ckpt["settings"].get(k))
            raise RepnetError(f"cannot resume {out_dir}: its settings differ ({', '.join(changed)}); only --rounds "
                              "may change")
    elif ckpt_path is not None:
        claim_folder(ckpt_path.parent, kind=RUN, overwrite=overwrite)
    device = resolve_device(cfg.device)
    train_ds, _val, test_ds, num_classes, _names = build_data(cfg)
    shards = partition(train_ds.targets, clients, scheme, cfg.seed)
    if min(len(s) for s in shards) < cfg.batch_size:
        raise RepnetError(f"a client got {min(len(s) for s in shards)} images, less than one batch of "
                          f"{cfg.batch_size}: fewer clients, a milder partition, or a smaller batch")
    seed_everything(cfg.seed)
    model = build_model(cfg, num_classes).to(device)  # --set int8=true: every client trains in INT8
    local_cfg = dataclasses.replace(cfg, epochs=local_epochs, max_steps=None, checkpoint_every=0, progress=False)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    global_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    msg_bytes = state_bytes(global_state)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    test_loader = make_loader(test_ds, cfg, device)
    first = 1
    if ckpt is not None:
        global_state = {k: v.to(device) for k, v in ckpt["global_state"].items()}
        model.load_state_dict(global_state, strict=False)
        history = ckpt["history"]
        first = ckpt["round"] + 1
        set_rng_state(ckpt["rng"])
    else:
        history = [{"round": 0, "test_accuracy": evaluate(model, test_loader, device)["accuracy"]}]
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bar = tqdm(range(first, rounds + 1), desc="rounds", disable=not progress)
    for r in bar:
        states, sizes, losses = [], [], []
        for k, shard in enumerate(shards):
            model.load_state_dict(global_state, strict=False)
            loss = _local_train(model, Subset(train_ds, shard.tolist()), local_cfg, device, mix_seed(cfg.seed, r, k))
            states.append({k2: v.detach().clone() for k2, v in model.trainable_state_dict().items()})
            sizes.append(len(shard))
            losses.append(loss)
        global_state = fedavg_states(states, sizes)
        model.load_state_dict(global_state, strict=False)
        acc = evaluate(model, test_loader, device)["accuracy"]
        history.append({"round": r, "test_accuracy": acc,
                        "client_train_loss": float(np.average(losses, weights=sizes))})
        bar.set_postfix(acc=f"{acc:.3f}")
        if ckpt_path is not None:
            save_checkpoint({"round": r, "global_state": {k: v.cpu() for k, v in global_state.items()},
                               "history": history, "rng": rng_state(), "settings": settings}, ckpt_path)
        if on_round is not None:
            on_round(r)
    exchanged = {k[len("backbone."):] for k in global_state if k.startswith("backbone.")}  # e.g. biases
    changed = [k for k, v in model.backbone.state_dict().items()
               if k not in exchanged and not torch.equal(v, backbone_before[k])]
    results = {
        "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "options": cfg.options,
        "clients": clients, "rounds": rounds, "local_epochs": local_epochs, "partition": scheme,
        "client_images": [len(s) for s in shards], "num_classes": num_classes,
        "test_accuracy": history[-1]["test_accuracy"], "history": history,
        "message_bytes": msg_bytes, "full_model_bytes": full_bytes,
        "bytes_per_round": 2 * clients * msg_bytes,
        "total_bytes": 2 * clients * msg_bytes * rounds,
        "frozen_backbone_tensors_changed": changed,  # must stay empty
        "backbone_tensors_exchanged": len(exchanged),
        "wall_time_s": time.time() - t0, "config": cfg.to_dict(),
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out / "adapter"))
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        results["out_dir"] = str(out)
    return results
