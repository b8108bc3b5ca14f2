"""How config keys are spelled on the command line: the ``repnet train`` flag of each key, and the
``repnet train`` arguments equivalent to a set of overrides (the commands ``repnet plan`` and
``repnet reproduce --dry-run`` print).

Every key ``some_key`` is ``--some-key`` (``out_dir`` is ``--out``, ``options`` is ``--opt key=value``),
so a printed command runs exactly the configuration it was made from.
"""
from __future__ import annotations

from repnet.config.schema import FIELDS



#: Flags whose spelling is not ``--<key with dashes>`` (repnet.commands.flags builds the rest).
FLAG_NAMES = {"out_dir": "--out", "profile_memory": "--no-profile", "progress": "--quiet"}


def cli_flag(key: str) -> str:
    """The ``repnet train`` flag of config key ``key``."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def train_arguments(overrides: dict) -> list[str]:
    """``repnet train`` arguments equivalent to ``overrides`` (for printed plans)."""
    parts: list[str] = []
    for k, v in overrides.items():
        if k == "options":
            parts += [a for ok, ov in v.items() for a in ("--opt", f"{ok}={ov}")]
        elif isinstance(v, bool) or k not in FIELDS:
            parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        else:
            parts += [cli_flag(k), str(v)]
    return parts
