"""The ``repnet`` command line: one module per command under :mod:`repnet.commands`.

The parser is built from ``commands.COMMANDS`` (each module's ``HELP``, ``configure`` and ``run``),
importing no torch, so ``repnet --help`` starts in 0.2 s. Every error a user can cause prints one
line (``error: ...``) and exits with status 2; Ctrl-C during training writes a checkpoint, prints the
resume command and exits with status 130. docs/usage.md holds the conventions every command shares.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from repnet.commands import COMMANDS
from repnet.errors import Interrupted, RepnetError


class UsageError(RepnetError):
    """A command line argparse refused (unknown flag, bad choice, missing value)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, exit 2) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="repnet", description="Memory-efficient on-device transfer learning (Rep-Net).")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's, the machine's cores)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        sp = sub.add_parser(name, help=mod.HELP)
        mod.configure(sp)
        sp.set_defaults(func=mod.run, command_module=mod)
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path the command was given (its module's ``OUTPUTS``: dest -> file / folder / run,
    or its ``outputs(args)``), checked by :func:`repnet.storage.check_output` before any work."""
    from repnet.commands.flags import outputs_of

    given = {dest: kind for dest, kind in outputs_of(args.command_module, args).items()
             if getattr(args, dest, None) is not None}
    if given:
        from repnet.config.flags import cli_flag
        from repnet.storage import check_output

        for dest, kind in given.items():
            check_output(getattr(args, dest), kind, cli_flag(dest))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_outputs(args)
        if args.threads is not None:
            from repnet.limits import MAX_THREADS, check_int

            check_int("--threads", args.threads, 1, MAX_THREADS)
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except RepnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `repnet list | head`
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
