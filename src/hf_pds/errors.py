"""How a command of ``hf-pds`` reports what a user got wrong: one line on stderr and exit code 2.

Bad input, a dataset or pipeline that cannot be loaded, an output folder that may not be replaced, a full disk, a
Hub that refuses a push: each is a user's error, told in one line that names the problem. Anything else is a fault
of hf-pds or of the machine, and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable


class NoSpaceError(OSError):
    """A disk is too full for what hf-pds writes (``errno.ENOSPC``); the message names the disk and the sizes."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # pickled with its message alone (an error is broadcast between processes)
        return type(self), (self.strerror,)


# The errors hf-pds raises for a user's input, and those of the libraries it loads data and models with.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileExistsError,
    FileNotFoundError,
    PermissionError,
    ConnectionError,
    ImportError,
    NoSpaceError,
)


def run_command(command: str, function: Callable, *args) -> int:
    """``function(*args)`` as the command ``hf-pds COMMAND`` runs it; returns the exit code (0, 2 for a user's
    error, 130 when interrupted)."""
    try:
        function(*args)
    except USER_ERRORS as error:
        print(f"hf-pds {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-pds {command}: interrupted; the same command resumes a distillation.", file=sys.stderr)
        return 130
    return 0
