"""User-facing errors: one clear line, never a traceback from the CLI."""


class RepnetError(Exception):
    """An error the user caused (bad name, missing file, wrong layout, ...).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


class Interrupted(RepnetError):
    """Training stopped by Ctrl-C after writing a checkpoint; the CLI exits with status 130."""


class NonFinite(RepnetError):
    """Training produced a non-finite loss or weights (one line, exit 2; the last good checkpoint is kept)."""
