"""User-facing errors: one clear line, never a traceback from the CLI.

:class:`RepnetError` is everything a user can get wrong (a bad value, a missing file, a refused
setting): the command line prints it as ``error: ...`` and exits with status 2. :class:`Interrupted`
is Ctrl-C during training, after the checkpoint was written (exit 130, with the resume command);
:class:`NonFinite` is a diverged run (a NaN / inf loss or weight).
"""


class RepnetError(Exception):
    """An error the user caused (bad name, missing file, wrong layout, ...).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


class Interrupted(RepnetError):
    """Training stopped by Ctrl-C after writing a checkpoint; the CLI exits with status 130."""


class NonFinite(RepnetError):
    """Training produced a non-finite loss or weights (one line, exit 2; the last good checkpoint is kept)."""
