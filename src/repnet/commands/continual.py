"""``repnet continual``: tasks in sequence on one frozen backbone (see repnet.continual).

The flags are ``repnet train``'s (generated from ``TrainConfig``, commands/flags.py) plus ``--tasks``
(the datasets in training order), ``--naive`` (the forgetting baseline) and ``--resume`` /
``--overwrite`` of the run folder; the work is :func:`repnet.continual.sequence.train_sequence`.
docs/continual.md is the guide.
"""
from __future__ import annotations

import argparse

from repnet.commands.flags import add_config_flags, add_overwrite_flag, check_resume_overwrite, overrides_from

HELP = "tasks in sequence on one frozen backbone, each with its own adapter"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"out_dir": "run"}

#: The training config keys with a flag here (the rest: --set key=value).
KEYS = ("out_dir", "random_init", "int8", "progress", "backbone", "method", "weights", "memory", "image_size",
        "epochs", "batch_size", "lr", "lr_side", "label_smoothing", "train_subset", "test_subset", "steps_per_epoch",
        "max_steps", "seed", "device", "workers", "data_root")


def configure(p: argparse.ArgumentParser) -> None:
    """``repnet continual``'s arguments (the ``repnet train`` flags that make sense per sequence)."""
    p.add_argument("--tasks", required=True, help="comma-separated datasets in training order (name=dataset to "
                   "name a task), e.g. digits,fashion_mnist,mnist5k")
    add_config_flags(p, KEYS)
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out after its last "
                   "finished task")
    add_overwrite_flag(p)
    p.add_argument("--naive", action="store_true", help="the forgetting baseline: tasks train backbone tensors in "
                   "place, one after another (e.g. --method bias or full)")


def run(args: argparse.Namespace) -> int:
    check_resume_overwrite(args)
    from repnet.continual.sequence import train_sequence

    overrides = overrides_from(args)
    overrides.pop("profile_memory", None)
    kw = {k: overrides.pop(k) for k in ("backbone", "method", "options", "out_dir") if k in overrides}
    train_sequence(args.tasks, naive=args.naive, resume=args.resume, overwrite=args.overwrite, **kw, **overrides)
    return 0
