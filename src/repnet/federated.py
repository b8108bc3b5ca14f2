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
* Local training: the config's optimizer (Adam by default; ``optimizer``, ``weight_decay``)
  with the method's two parameter groups (``lr`` / ``lr_side``), a fresh optimizer each round
  (no optimizer state travels), label smoothing from the recipe; no learning-rate schedule.
* Integer buffers (e.g. ``num_batches_tracked``) are summed counters, not averaged: the
  server keeps the largest.
* ``--set int8=true``: every client trains the side network in INT8 (``repnet.int8``). With
  ``int8_master=int8`` the clients' weights lie on their int8 grids; their average need not,
  and is put back on the grid by the next local step.

    repnet federated --dataset digits --clients 4 --rounds 5 --partition dirichlet:0.5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .errors import RepnetError
from .storage import atomic_write_text, clean_temps, load_checkpoint, save_checkpoint

__all__ = ["partition", "fedavg_states", "state_bytes", "run_federated", "configure_federated_parser",
           "cli_federated"]


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


def _local_train(model, loader, cfg, device, epochs: int) -> tuple[float, int]:
    from .training import make_optimizer

    opt = make_optimizer(model, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = criterion(model(x), y)
            if not torch.isfinite(loss):
                raise RepnetError(f"loss became {loss.item()} during local training; lower --lr / --lr-side")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.numel()
            seen += y.numel()
    return loss_sum / max(seen, 1), seen


def run_federated(overrides: dict, clients: int = 4, rounds: int = 5, local_epochs: int = 1,
                  scheme: str = "iid", out_dir: str | None = None, progress: bool = True, resume: bool = False,
                  on_round=None) -> dict:
    """FedAvg of ``method``'s trainable state over ``clients`` shards of the dataset.

    ``overrides`` are training config keys (``repnet.training.make_config``): dataset,
    backbone, method, options, image_size, batch_size, lr, lr_side, train_subset, seed, ...
    With ``out_dir``: a checkpoint after every round (atomic), ``results.json`` (per-round test
    accuracy, bytes exchanged) and the final adapter at the end. ``resume=True`` continues the
    run in ``out_dir`` from its last round, bit-identically (same settings; ``rounds`` may grow).
    ``on_round(round)`` is called after each round's checkpoint (a hook for tests).
    """
    from tqdm.auto import tqdm

    from .api import get_model
    from .backbones import create_backbone
    from .training import (build_data, evaluate, make_config,
                           resolve_device, rng_state, seed_everything, set_rng_state)

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
    elif ckpt_path is not None and ckpt_path.exists():
        raise RepnetError(f"{out_dir} already holds a federated run; continue it with --resume, or pick --out")
    device = resolve_device(cfg.device)
    probe = create_backbone(cfg.backbone, pretrained=False)
    train_ds, _val, test_ds, num_classes, _names = build_data(cfg, probe.mean, probe.std)
    del probe
    shards = partition(train_ds.targets, clients, scheme, cfg.seed)
    if min(len(s) for s in shards) < cfg.batch_size:
        raise RepnetError(f"a client got {min(len(s) for s in shards)} images, less than one batch of "
                          f"{cfg.batch_size}: fewer clients, a milder partition, or a smaller batch")
    seed_everything(cfg.seed)
    pretrained = False if cfg.random_init else (cfg.weights or True)
    model = get_model(cfg.backbone, cfg.method, num_classes, image_size=cfg.image_size, pretrained=pretrained,
                      memory=cfg.memory, **cfg.options).to(device)
    if cfg.int8:  # int8 side network on every client (repnet.int8); the averaged state stays fp32 / on-grid
        from .int8 import enable_int8_training

        enable_int8_training(model, rounding=cfg.int8_rounding, master=cfg.int8_master)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    global_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    msg_bytes = state_bytes(global_state)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    test_loader = DataLoader(test_ds, batch_size=max(cfg.batch_size, 64), num_workers=cfg.workers)
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
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + r * 1009 + k)
            loader = DataLoader(Subset(train_ds, shard.tolist()), batch_size=cfg.batch_size, shuffle=True,
                                drop_last=True, generator=g, num_workers=cfg.workers)
            loss, _ = _local_train(model, loader, cfg, device, local_epochs)
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


def configure_federated_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--method", default="repnet")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (default: iid)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="training config key (repeatable), e.g. --set image_size=96 --set train_subset=2000")
    p.add_argument("--out", help="folder for the per-round checkpoint, results.json and the final adapter")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last round")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_federated(args: argparse.Namespace) -> int:
    from .training import _pairs

    ov = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "progress": not args.quiet}
    ov.update(_pairs(args.set, "--set"))
    opts = _pairs(args.opt, "--opt")
    if opts:
        ov["options"] = opts
    if args.resume and not args.out:
        raise RepnetError("--resume needs --out (the run folder)")
    res = run_federated(ov, args.clients, args.rounds, args.local_epochs, args.partition, args.out,
                        progress=not args.quiet, resume=args.resume)
    accs = " -> ".join(f"{h['test_accuracy']:.3f}" for h in res["history"])
    print(f"test accuracy by round: {accs}")
    print(f"each message {res['message_bytes'] / 1e6:.2f} MB (the whole model: {res['full_model_bytes'] / 1e6:.2f} MB); "
          f"{res['total_bytes'] / 1e6:.1f} MB exchanged in {res['rounds']} rounds x {res['clients']} clients")
    if args.out:
        print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'adapter'}")
    return 0
