"""The one training loop: :func:`fit`, and the pieces every workflow trains with.

``repnet train``, continual learning, federated clients, the demo and the reproduction harness all
train through :func:`fit`; they differ only in what they hand it (model, data, optimizer and schedule,
the seed of the data order, callbacks). It guarantees, for every caller: a deterministic data order
drawn from ``(seed, epoch, index)`` (:class:`EpochSampler`), so resumed runs take exactly the same
steps; a one-line stop on a non-finite loss; Ctrl-C checkpointing between steps; exact gradient
accumulation (``accum_steps``, steps counted as optimizer steps); and a runtime's whole step
(``step=``). Each guarantee in full: docs/training.md, "What the loop guarantees".
"""
from __future__ import annotations

import math
import random
import signal
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from repnet.config.schema import TrainConfig
from repnet.errors import Interrupted, NonFinite, RepnetError
from repnet.optim import CosineSchedule, build_optimizer  # noqa: F401 (CosineSchedule: re-exported)

# ----------------------------------------------------------------------------- data order
def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """Yields ``(index, item_seed)``: the order of epoch ``e`` is a permutation drawn from
    ``(seed, e)``, and each item's augmentation seed from ``(seed, e, index)``.

    ``start`` skips the first ``start`` items (resuming mid-epoch); ``limit`` keeps the first
    ``limit`` items of the permutation (``steps_per_epoch``).
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, limit: int | None = None):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.limit = n if limit is None else min(n, limit)

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)[: self.limit].tolist()
        for i in order[self.start:]:
            yield i, mix_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, self.limit - self.start)


class SeededItems(Dataset):
    """Loads item ``(index, seed)`` with the torch / python RNGs seeded for its augmentation,
    restoring the caller's RNG states after (so data loading never moves dropout's RNG)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


# ----------------------------------------------------------------------------- optimizer, schedule, RNG
def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over the method's two parameter groups (head + backbone tensors at
    ``lr``, side modules at ``lr_side``); in int8-master mode it re-projects after each step."""
    from repnet.memory.int8 import attach_int8_master

    groups = model.param_groups(cfg.lr, cfg.lr_side)
    if cfg.weight_decay_side is not None:
        for g in groups:
            if g.get("name") == "side":
                g["weight_decay"] = cfg.weight_decay_side
    optimizer = build_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
    attach_int8_master(model, optimizer)
    return optimizer


def schedule_of(cfg: TrainConfig, total_steps: int) -> CosineSchedule:
    """The learning-rate factor per step of a run of ``total_steps`` under ``cfg`` (warm-up, then cosine)."""
    return CosineSchedule.for_run(total_steps, cfg.warmup_fraction)


def plan_steps(n_train: int, cfg: TrainConfig, what: str = "") -> tuple[int, int]:
    """``(steps per epoch, total steps)`` for ``n_train`` images under the config's limits, in
    optimizer steps of ``batch_size x accum_steps`` images (a last partial one is dropped)."""
    accum = cfg.accum_steps
    steps_per_epoch = n_train // (cfg.batch_size * accum)
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:
        raise RepnetError(f"{what}{n_train} training images is less than one batch of {cfg.batch_size}"
                          + (f" x {accum} accumulation steps" if accum > 1 else ""))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RepnetError(f"device '{name}' requested but CUDA is not available (use --device cpu)")
    return torch.device(name)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, progress: bool = False, desc: str = "eval") -> dict:
    """Mean cross-entropy (no smoothing) and top-1 accuracy over ``loader``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
    model.train(was_training)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen}


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def make_loader(ds, cfg: TrainConfig, device, sampler=None) -> DataLoader:
    """Training batches in ``sampler``'s seeded order (``drop_last``), or evaluation batches of >= 64."""
    return DataLoader(
        SeededItems(ds) if sampler is not None else ds,
        batch_size=cfg.batch_size if sampler is not None else max(cfg.batch_size, 64),
        sampler=sampler, shuffle=False, drop_last=sampler is not None, num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # the loader's own seed draw must not move the global RNG
    )


def all_finite(model) -> bool:
    """Whether every floating tensor that training changes is finite."""
    return _all_finite(model.trainable_state_dict().values())


# ----------------------------------------------------------------------------- the loop
def new_state() -> dict:
    """Everything about a run's progress that a checkpoint must restore (plain values only)."""
    return {"epoch": 0, "batch": 0, "step": 0,  # epochs done, batches done in the current epoch, steps done
            "last_val": None, "best_val": None, "best_val_epoch": None, "best_test": None, "best_test_epoch": None,
            "epoch_stats": [0.0, 0, 0],  # loss sum, correct, images of the current epoch so far
            "elapsed": 0.0, "train_time": 0.0, "images": 0}


class _SigintFlag:
    """While active (main thread only), Ctrl-C sets ``hit`` instead of raising mid-step."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def fit(model: nn.Module, train_ds, cfg: TrainConfig, device: torch.device, optimizer: torch.optim.Optimizer, *,
        scheduler=None, state: dict | None = None, seed: int | None = None, val_ds=None,
        checkpoint: Callable[[dict], None] | None = None, on_step: Callable[[dict], None] | None = None,
        on_epoch: Callable[[dict, dict], None] | None = None, name: str = "", stop_hint: str = "",
        resume_hint: str = "", objective: Callable | None = None, step: Callable | None = None) -> dict:
    """Train ``model`` on ``train_ds`` for ``cfg.epochs`` (within ``cfg``'s step limits); returns the state.

    * ``state``: where to continue (``new_state()`` when None); updated in place and returned.
    * ``seed``: of the data order and augmentation (default ``cfg.seed``).
    * ``scheduler``: stepped after every optimizer step (None: a constant learning rate).
    * ``val_ds``: evaluated at every epoch end (``val_loss`` / ``val_accuracy`` in the record).
    * ``checkpoint(state)``: called every ``cfg.checkpoint_every`` steps, at every epoch end and on
      Ctrl-C; ``on_step(info)`` after every step (``{"step", "epoch", "loss", "model"}``; raising
      stops the run); ``on_epoch(state, record)`` at every epoch end, before the checkpoint.
    * ``objective(x, y) -> (loss, logits or None)``: another loss than the classification one
      (e.g. a self-supervised warm-up); without logits no training accuracy is counted.
    * ``step(x, y) -> (loss, logits)``: the whole training step done elsewhere (a device runtime's
      forward + backward + optimizer, e.g. :class:`repnet.runtime.executorch.trainer.RuntimeTrainer`);
      ``optimizer`` and ``scheduler`` are then not stepped here, and ``cfg.accum_steps`` must be 1.
    * ``name`` prefixes messages (``task 'digits': ``); ``stop_hint`` / ``resume_hint`` end the
      non-finite and the interrupt messages (e.g. the last good checkpoint, the resume command).
    """
    from tqdm.auto import tqdm

    st = state if state is not None else new_state()
    seed = cfg.seed if seed is None else seed
    prefix = f"{name}: " if name else ""
    accum = cfg.accum_steps
    if step is not None and accum > 1:
        raise RepnetError(f"{prefix}accum_steps={accum}: gradient accumulation needs the eager loop (a runtime's "
                          "step updates the weights after every batch); use accum_steps=1")
    images_per_step = cfg.batch_size * accum
    steps_per_epoch, total_steps = plan_steps(len(train_ds), cfg, prefix)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val_loader = make_loader(val_ds, cfg, device) if val_ds is not None else None
    model.train()
    with _SigintFlag() as sigint:
        while st["step"] < total_steps and st["epoch"] < cfg.epochs:
            epoch = st["epoch"]
            sampler = EpochSampler(len(train_ds), seed, epoch, start=st["batch"] * images_per_step,
                                   limit=steps_per_epoch * images_per_step)
            n_batches = min(steps_per_epoch, st["batch"] + total_steps - st["step"])
            bar = tqdm(total=n_batches, initial=st["batch"], desc=f"{name + ' ' if name else ''}epoch "
                       f"{epoch + 1}/{cfg.epochs}", leave=False, disable=not cfg.progress, dynamic_ncols=True)
            t_epoch, images_epoch = time.time(), 0
            batches = iter(make_loader(train_ds, cfg, device, sampler))
            micro, group = 0, [0.0, 0, 0]  # micro-batches done in this step; their loss sum, correct, images
            try:
                while True:
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    except RuntimeError:  # a data-loader worker killed by the same Ctrl-C
                        if sigint.hit:
                            break
                        raise
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    try:
                        if step is not None:
                            loss, logits = step(x, y)
                        elif objective is None:
                            logits = model(x)
                            loss = criterion(logits, y)
                        else:
                            loss, logits = objective(x, y)
                    except ValueError as e:
                        if "Expected more than 1 value per channel" not in str(e):
                            raise
                        raise RepnetError(f"{prefix}batch size {x.shape[0]} cannot train a batch-norm layer on a "
                                          "1x1 feature map (it needs 2+ values per channel): use a larger "
                                          "--batch-size or --image-size") from None
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise NonFinite(f"{prefix}loss became {loss_value} at epoch {epoch + 1} step "
                                          f"{st['step'] + 1}{stop_hint}")
                    if step is None:
                        if micro == 0:
                            optimizer.zero_grad(set_to_none=True)
                        (loss / accum if accum > 1 else loss).backward()
                    micro += 1
                    group[0] += loss_value * y.numel()
                    if logits is not None:
                        group[1] += int((logits.detach().argmax(1) == y).sum())
                    group[2] += y.numel()
                    if micro < accum:  # (Ctrl-C too waits for the step's last micro-batch)
                        continue
                    if step is None:
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                    if accum > 1:
                        loss_value = group[0] / group[2]  # the step's loss: the mean over its images
                    st["step"] += 1
                    st["batch"] += 1
                    stats = st["epoch_stats"]  # a step's figures enter the state whole, never a part of one
                    for i in range(3):
                        stats[i] += group[i]
                    images_epoch += group[2]
                    micro, group = 0, [0.0, 0, 0]
                    bar.set_postfix(loss=f"{stats[0] / stats[2]:.3f}", acc=f"{stats[1] / stats[2]:.3f}",
                                    img_s=f"{images_epoch / max(time.time() - t_epoch, 1e-9):.0f}", refresh=False)
                    bar.update()
                    if on_step is not None:
                        on_step({"step": st["step"], "epoch": epoch, "loss": loss_value, "model": model})
                    if st["step"] >= total_steps or st["batch"] >= steps_per_epoch:
                        break
                    if sigint.hit:
                        break
                    if checkpoint is not None and cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                        checkpoint(st)
            finally:
                bar.close()
            train_secs = time.time() - t_epoch
            st["train_time"] += train_secs
            st["images"] += images_epoch
            if sigint.hit and st["batch"] < steps_per_epoch and st["step"] < total_steps:
                if checkpoint is not None:
                    checkpoint(st)
                raise Interrupted(f"{prefix}interrupted at epoch {epoch + 1} step {st['step']}"
                                  + (f"; checkpoint written{resume_hint}" if checkpoint is not None else ""))

            # ---- end of epoch: validate, report, checkpoint
            loss_sum, correct, seen = st["epoch_stats"]
            rec = {"epoch": epoch + 1, "step": st["step"], "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                   "images_per_s": images_epoch / max(train_secs, 1e-9)}
            if val_loader is not None:
                v = evaluate(model, val_loader, device)
                rec.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
                st["last_val"] = v["accuracy"]
                if st["best_val"] is None or v["accuracy"] > st["best_val"]:
                    st["best_val"], st["best_val_epoch"] = v["accuracy"], epoch + 1
            st["epoch"], st["batch"], st["epoch_stats"] = epoch + 1, 0, [0.0, 0, 0]
            if on_epoch is not None:
                on_epoch(st, rec)
            if checkpoint is not None:
                checkpoint(st)
            if cfg.progress:
                print(f"{prefix}epoch {epoch + 1}/{cfg.epochs} step {st['step']}: train loss {rec['train_loss']:.4f} "
                      f"acc {rec['train_accuracy']:.4f}"
                      + (f" | val acc {rec['val_accuracy']:.4f}" if "val_accuracy" in rec else "")
                      + f" | {rec['images_per_s']:.0f} img/s")
            if sigint.hit:
                raise Interrupted(f"{prefix}interrupted after epoch {epoch + 1}"
                                  + (f"; checkpoint written{resume_hint}" if checkpoint is not None else ""))
    return st
