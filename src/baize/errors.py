"""User-facing errors: each carries one line that names the key, file:line or value at fault.

Stages turn these into that one line on stderr and a non-zero exit instead of a traceback.
"""

import functools
import json
import sys
from collections.abc import Callable
from typing import Any


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


def json_line(raw: bytes | str, path, lineno: int) -> Any:
    """One JSONL line, parsed; bad UTF-8 or JSON is an InputError at path:line naming the real column.

    The line end is stripped before decoding: with it attached, an error at the end of a line (a value missing
    after the last `:`) is reported at column 1 of a line 2 that does not exist.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(path, lineno, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise InputError(path, lineno, f"invalid JSON: {json_error(exc)}") from None


def json_error(exc: json.JSONDecodeError) -> str:
    """`<what> (column N)` of an error in one line of JSON."""
    return f"{exc.msg} (column {exc.colno})"


def _close_progress_bars() -> None:
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


def one_line_errors(fn: Callable) -> Callable:
    """Decorate a command: a BaizeError becomes `error: <one line>` on stderr and its exit status, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaizeError as exc:
            _close_progress_bars()  # else a bar left open redraws itself at exit, below the error line
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper
