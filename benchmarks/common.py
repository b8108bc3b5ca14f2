"""What the benchmark scripts share: the command line that made a result, and the one way a results
document is written (folders made, JSON written atomically).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from repnet.demo.run import provenance
from repnet.storage import atomic_write_text

__all__ = ["command_line", "write_results", "provenance"]


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running (a script's ``sys.argv[0]`` with ``argv``, or its own
    arguments), as a shell line to record next to its results."""
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args])


def write_results(path: str | os.PathLike, doc: dict) -> None:
    """A benchmark's results document, as JSON at ``path`` (folders made; written atomically)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
