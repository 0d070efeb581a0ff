"""User-facing errors: each carries one line that names the key, file:line or value at fault.

Stages turn these into that one line on stderr and a non-zero exit instead of a traceback.
"""

import functools
import sys
from collections.abc import Callable


class BaizeError(Exception):
    """A problem the user can fix (bad input file, missing model, unreachable server). Exit status 1."""

    exit_code = 1


class ParamsError(BaizeError):
    """A params.yaml value that fails the schema. Exit status 2, nothing written."""

    exit_code = 2


class InputError(BaizeError):
    """A malformed input file; the message names file:line."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


def one_line_errors(fn: Callable) -> Callable:
    """Decorate a command: a BaizeError becomes `error: <one line>` on stderr and its exit status, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaizeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper
