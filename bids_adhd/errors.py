"""User-facing errors, one class per BIDS-Apps exit code.

Every error a user can cause is raised as one of these with a one-line,
actionable message. ``cli.main`` prints ``bids_adhd: error: <message>`` and
exits with ``exit_code``; no traceback unless ``-v`` is given.

Exit codes follow the BIDS-Apps execution specification:
64 usage, 65 bad data, 66 missing input, 16 validation failed,
18 filters selected nothing, 73 cannot create output.
"""
from __future__ import annotations


class BidsAppError(Exception):
    """Base class: a user error with a BIDS-Apps exit code."""

    exit_code = 1

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(BidsAppError):
    """Impossible or contradictory command-line options (EX_USAGE)."""

    exit_code = 64


class DataError(BidsAppError):
    """Input data present but wrong: bad b-table, corrupt image, ... (EX_DATAERR)."""

    exit_code = 65


class MissingInputError(BidsAppError):
    """An input path or file that must exist does not (EX_NOINPUT)."""

    exit_code = 66


class ValidationError(BidsAppError):
    """The dataset failed BIDS validation."""

    exit_code = 16


class NothingSelectedError(BidsAppError):
    """Participant/session labels or BIDS filters selected no data."""

    exit_code = 18


class OutputError(BidsAppError):
    """The output (or work) directory cannot be created or written (EX_CANTCREAT)."""

    exit_code = 73


EXIT_CODES = {
    cls.__name__: cls.exit_code
    for cls in (UsageError, DataError, MissingInputError, ValidationError,
                NothingSelectedError, OutputError)
}
