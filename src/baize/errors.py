"""User-facing errors: each carries one line that names the key, file:line or value at fault.

Stages turn these into that one line on stderr and a non-zero exit instead of a traceback.
"""


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
