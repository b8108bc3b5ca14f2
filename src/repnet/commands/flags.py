"""Command-line flags generated from :class:`~repnet.config.TrainConfig`'s fields.

Every field ``some_key`` is ``--some-key`` (``out_dir`` is ``--out``; ``options`` is ``--opt
key=value``); a boolean field that defaults to False is a switch (``--int8``), and the two that
default to True are switched off (``--no-profile``, ``--quiet``). ``--set key=value`` reaches
every field too. Unset flags stay None, so the dataset's recipe decides.
"""
from __future__ import annotations

import argparse
import dataclasses

from repnet.config.schema import FIELDS, choices_of
from repnet.config.flags import cli_flag as flag
from repnet.keyvalue import parse_pairs

def add_config_flags(p: argparse.ArgumentParser, keys=None) -> None:
    """Add one flag per config field (or per ``keys``), plus ``--opt`` and ``--set``."""
    for key, f in FIELDS.items():
        if key == "options" or (keys is not None and key not in keys):
            continue
        help_text = f.metadata["help"]
        if f.type == "bool" or f.type is bool:
            on = f.default is False
            p.add_argument(flag(key), dest=key, action="store_true" if on else "store_false", default=None,
                           help=help_text if on else f"turn off: {help_text}")
            continue
        if f.type == "bool | None":  # on / off / unset (the field's own default rule decides)
            p.add_argument(flag(key), dest=key, action="store_true", default=None, help=help_text)
            p.add_argument("--no-" + flag(key).removeprefix("--"), dest=key, action="store_false", default=None,
                           help=f"turn off: {help_text}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "the recipe's" if key in ("lr", "lr_side", "label_smoothing") else default
        choices = choices_of(key)
        text = help_text if "default" in help_text else f"{help_text} (default: {shown})"
        p.add_argument(flag(key), dest=key, default=None, choices=choices,
                       metavar=None if choices else key.upper(), help=text.replace("%", "%%"))
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option (repeatable); see `repnet list -v`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable), e.g. --set download=true")


def overrides_from(args: argparse.Namespace) -> dict:
    """The config overrides the user gave: flags that were set, then ``--set``, then ``--opt``."""
    out = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None and k != "options"}
    out.update(parse_pairs(getattr(args, "set", None), "--set"))
    opts = parse_pairs(getattr(args, "opt", None), "--opt")
    if opts:
        out["options"] = {**out.get("options", {}), **opts}
    return out


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` of a command whose ``--out`` is a run folder (``storage.claim_folder``)."""
    p.add_argument("--overwrite", action="store_true", help="--out may hold an earlier run of this kind: replace it "
                   "(a folder with anything else is still refused)")


def check_resume_overwrite(args: argparse.Namespace) -> None:
    if getattr(args, "resume", None) and getattr(args, "overwrite", False):
        from repnet.errors import RepnetError

        raise RepnetError("--resume continues a run and --overwrite replaces it: give one of them")



def outputs_of(module, args: argparse.Namespace) -> dict[str, str]:
    """The output arguments of a command (dest -> ``file`` / ``folder`` / ``run``, see
    :func:`repnet.storage.check_output`) for these ``args``: its module's ``outputs(args)`` where the set
    depends on other flags, else its ``OUTPUTS``."""
    pick = getattr(module, "outputs", None)
    return dict(pick(args)) if pick is not None else dict(getattr(module, "OUTPUTS"))
