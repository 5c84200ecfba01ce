"""User-facing errors of the training application.

A :class:`PeftkitError` is a mistake the user can fix (a bad flag, a bad data row, a missing file).
The CLI prints its message as one line and exits non-zero, without a traceback unless ``--debug``.
"""


class PeftkitError(Exception):
    """An error caused by user input; its message says what is wrong and what would be right."""


class Interrupted(PeftkitError):
    """Training stopped by Ctrl-C / SIGTERM after saving a checkpoint; exits with status 130."""

    exit_code = 130
