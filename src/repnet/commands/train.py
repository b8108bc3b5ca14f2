"""``repnet train``: one method on one dataset, the dataset's recipe unless told otherwise.

Every ``TrainConfig`` key is a flag (commands/flags.py) and also ``--set key=value``; ``--config``
reads a config file (e.g. a run's ``config.yaml``) under the flags, ``--resume`` continues a run
folder bit for bit and ``--overwrite`` replaces an earlier run of the same kind. The work is
:func:`repnet.training.run.train`; docs/training.md is the guide.
"""
from __future__ import annotations

import argparse

from repnet.commands.flags import add_config_flags, add_overwrite_flag, check_resume_overwrite, overrides_from

HELP = "train a method on a dataset (paper recipe by default)"
#: Output arguments (dest -> file / folder / run: repnet.storage.check_output), checked before any work.
OUTPUTS = {"out_dir": "run"}


def configure(p: argparse.ArgumentParser) -> None:
    add_config_flags(p)
    p.add_argument("--config", metavar="YAML", help="a config file (e.g. a run's config.yaml); flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add_overwrite_flag(p)


def run(args: argparse.Namespace) -> int:
    check_resume_overwrite(args)
    from repnet.config.recipes import make_config
    from repnet.training.run import resume_config, train

    overrides = overrides_from(args)
    if args.resume:
        train(resume_config(args.resume, overrides), resume=args.resume)
    else:
        train(make_config(overrides, args.config), overwrite=args.overwrite)
    return 0
