"""How a command of ``hf-pds`` reports what a user got wrong: one line on stderr and exit code 2.

Bad input, a dataset or pipeline that cannot be loaded, an output folder that may not be replaced, a full disk, a
Hub that refuses a push: each is a user's error, told in one line that names the problem. Anything else is a fault
of hf-pds or of the machine, and keeps its traceback.

The messages are written for the Python API and name its arguments (``pass fresh=True``); a command tells them in
its own words, with its options (``pass --fresh``): see :func:`command_line_message`.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable, Mapping


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

# A value after ``name=``: quoted, a <placeholder>, or a word (a number, True, a name) that may end a sentence.
_VALUE = r"""'[^']*'|"[^"]*"|<[^>]*>|[\w.+*-]*\w"""
_QUOTES = "'\""


def command_line_message(message: str, options: Mapping[str, str]) -> str:
    """``message``, which names Python arguments, with each argument that is an option of the command spelled as
    the command line spells it.

    ``options`` maps an argument to its option (``"skip_invalid_rows"`` -> ``"--skip-invalid-rows"``).
    ``name=True`` becomes ``--flag`` (a switch), ``name=value`` ``--flag value``, ``name must ...`` ``--flag must
    ...``; a name with an underscore, which prose never uses, becomes ``--flag`` wherever it stands alone (not as a
    ``name:`` key). Other words are left as they are.
    """
    if not options:
        return message
    names = "|".join(re.escape(name) for name in sorted(options, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./'\"-])({names})(?:=({_VALUE})|( must\b)|(?![\w/:-]|\.\w))")

    def spelled(match: re.Match) -> str:
        name, value, must = match.groups()
        if value is not None:
            return options[name] if value == "True" else f"{options[name]} {value.strip(_QUOTES)}"
        if must is not None:
            return options[name] + must
        return options[name] if "_" in name else name

    return pattern.sub(spelled, message)


def run_command(command: str, function: Callable, *args, options: Mapping[str, str] | None = None) -> int:
    """``function(*args)`` as the command ``hf-pds COMMAND`` runs it; returns the exit code (0, 2 for a user's
    error, 130 when interrupted).

    A user's error is told with the command's ``options`` (see :func:`command_line_message`). An interruption says
    what was kept when the interrupted work says so (a distillation's :class:`~hf_pds.run_state.RunInterrupted`)."""
    try:
        function(*args)
    except USER_ERRORS as error:
        message = command_line_message(" ".join(str(error).split()), options or {})
        print(f"hf-pds {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"hf-pds {command}: interrupted; {str(interrupt) or 'no output was written.'}", file=sys.stderr)
        return 130
    return 0
