"""Progress for long work, on a terminal and off it.

`dvc repro` in a terminal passes the terminal on to each stage: there a tqdm bar redraws in place (at most once a
second, with the rate and the ETA). Off a terminal (`dvc exp run --queue`/`--temp` write the stage's output to a
log file, as do CI and `make repro | tee`), a bar would print nothing (`disable=None`) or one ever-growing line of
carriage returns: there the same bar prints one plain line every `LINE_INTERVAL_S` seconds and one at the end.

Either way a ticker thread redraws the bar while nothing advances (a batch of seeds that all finish at the end, a
model being read), so the elapsed time and the live postfix (tokens so far, ...) show that the work goes on: no
stage is silent for more than 15 s. `BAIZE_PROGRESS=0` turns every bar off, `=1` forces the terminal kind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

LINE_INTERVAL_S = 10.0  # off a terminal: one line this often at most (and at least, while the bar is open)
TTY_INTERVAL_S = 1.0


class _Lines:
    """The file a bar writes to off a terminal: each redraw (tqdm writes '\\r' + status) becomes one line."""

    def __init__(self, fp):
        self.fp = fp

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line.strip():
            self.fp.write(line + "\n")
            self.fp.flush()

    def flush(self) -> None:
        self.fp.flush()


def on_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    forced = os.environ.get("BAIZE_PROGRESS", "").strip()
    if forced == "1":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def enabled_by_default() -> bool:
    return os.environ.get("BAIZE_PROGRESS", "").strip() != "0"


class _Ticker(threading.Thread):
    """Redraws `bar` when it has not printed for `interval` seconds, with a fresh postfix."""

    def __init__(self, bar, interval: float, postfix: Callable[[], str] | None):
        super().__init__(daemon=True, name=f"progress-{bar.desc}")
        self.bar, self.interval, self.postfix = bar, interval, postfix
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(min(self.interval, 1.0)):
            try:
                if self.postfix is not None:
                    self.bar.set_postfix_str(self.postfix(), refresh=False)
                if time.time() - self.bar.last_print_t >= self.interval:
                    self.bar.refresh()
                    self.bar.last_print_t = time.time()  # refresh() leaves it: the next line one interval on
            except Exception:  # noqa: BLE001 - a progress line must never break the work
                return


def bar(total: int | float | None = None, *, desc: str, unit: str = "it", enabled: bool | None = None,
        postfix: Callable[[], str] | None = None, **kwargs: Any):
    """A tqdm bar for `total` units (None: a counter), drawn as the module docstring says; `enabled=False`: a
    disabled bar (every call a no-op). `postfix` is called at each redraw for the text after the rate. Close it
    (or use it as a context manager); `unit_scale`, `initial` ... pass through to tqdm."""
    from tqdm import tqdm

    if enabled is None:
        enabled = enabled_by_default()
    if not enabled:
        return tqdm(total=total, disable=True)
    terminal = on_terminal()
    interval = TTY_INTERVAL_S if terminal else LINE_INTERVAL_S
    options: dict[str, Any] = {"mininterval": interval, "dynamic_ncols": terminal}
    if not terminal:
        options.update(file=_Lines(sys.stderr), ascii=True, ncols=100)
    else:
        options["file"] = sys.stderr
    options.update(kwargs)
    progress = tqdm(total=total, desc=desc, unit=unit, disable=False, **options)
    ticker = _Ticker(progress, interval, postfix)
    ticker.start()
    close = progress.close

    def close_and_stop() -> None:
        ticker.stopped.set()
        if postfix is not None:
            with contextlib.suppress(Exception):
                progress.set_postfix_str(postfix(), refresh=False)
        close()

    progress.close = close_and_stop  # type: ignore[method-assign]
    return progress


@contextlib.contextmanager
def phases(desc: str, names: list[str], *, enabled: bool | None = None) -> Iterator[Callable[[str], None]]:
    """A bar over the named steps of one long job (read, convert, save, ...), showing the step under way and the
    time spent; yields `start(name)`, to call as each step begins (the previous one counts as done)."""
    progress = bar(len(names), desc=desc, unit="step", enabled=enabled,
                   bar_format="{desc}: step {n_fmt}/{total_fmt}{postfix} [{elapsed}]")
    state = {"started": 0}

    def start(name: str) -> None:
        if state["started"]:
            progress.update(1)
        state["started"] += 1
        progress.set_postfix_str(name)

    try:
        yield start
        if state["started"]:
            progress.update(1)
    finally:
        progress.close()
