"""Stopping a run of requests without losing what was paid for: Ctrl-C, SIGTERM, or an error that concerns every
request (a bad key, an unknown model, no quota left).

A stop means: start no new request (`check()` raises `StopRequested` where one would start), let the requests in
flight finish and be journaled, for at most `grace_s` seconds, then end the run with one line. A second Ctrl-C (or
SIGTERM) during that wait aborts it: the requests still in flight are cancelled, and a reply that was on its way
then is lost (and paid again by the next run).

The self-chat engine and the LLM judge share this: both keep many requests in flight, and a paid reply that is
still on the wire when the run ends is a reply paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from baize.errors import BaizeError


class StopRequested(Exception):
    """Raised where a new request would start once the run is stopping (never shown to the user)."""


class Interrupted(BaizeError):
    """The run stopped on a signal after journaling the requests in flight: exit 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Stopper:
    """One run's stop flag, its signal handlers and the bounded wait for the requests in flight."""

    def __init__(self, grace_s: float = 60.0, *, what: str = "run"):
        self.grace_s = grace_s
        self.what = what
        self.reason: str | None = None
        self.error: BaseException | None = None  # the error that stopped the run (re-raised at its end)
        self.signum: int | None = None
        self.signals = 0
        self.aborted = False  # a second signal, or the grace period ran out: requests in flight were cancelled
        self.cancelled_tasks = 0
        self.replies = None  # a callable: replies journaled so far in this run (for the summary)
        self.replies_at_stop: int | None = None
        self._event = asyncio.Event()
        self._abort = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self.reason is not None

    def stop(self, reason: str, error: BaseException | None = None) -> None:
        """Start no new request from now on; the first reason (and error) wins."""
        if self.reason is None:
            self.reason, self.error = reason, error
            self.replies_at_stop = self.replies() if self.replies else None
            self._event.set()

    def check(self) -> None:
        if self.reason is not None:
            raise StopRequested(self.reason)

    def finished_after_stop(self) -> str:
        """"N replies in flight at the stop were journaled" (what the wait saved), or "" before any stop."""
        if self.replies is None or self.replies_at_stop is None:
            return ""
        return f"{self.replies() - self.replies_at_stop} replies in flight at the stop were journaled"

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep` that ends early when the run stops (a retry's backoff must not hold up the stop)."""
        if seconds <= 0 or self.stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)

    # ---------------------------------------------------------------- signals

    def on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self.signum = signum
            self.stop(f"interrupted by {name}")
            print(
                f"{name}: {self.what}: starting no new request; waiting up to {self.grace_s:g} s for the requests in "
                f"flight to finish and be journaled ({name} again to abort)",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.aborted = True
            self._abort.set()

    @contextlib.contextmanager
    def signals_handled(self):
        """SIGINT and SIGTERM call `on_signal` while the block runs (in the running event loop)."""
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.on_signal, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        try:
            yield self
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    # ---------------------------------------------------------------- waiting

    async def wait(self, tasks: list[asyncio.Task]) -> None:
        """Wait for every task; once a stop is requested, for at most `grace_s` more seconds (or until a second
        signal), then cancel the rest. Tasks are expected to handle their own errors (they call `stop`)."""
        everything = asyncio.gather(*tasks, return_exceptions=True)
        stopped = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait([everything, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():
                abort = asyncio.ensure_future(self._abort.wait())
                try:
                    await asyncio.wait([everything, abort], timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    abort.cancel()
                if not everything.done():
                    self.aborted = True
                    self.cancelled_tasks = sum(not t.done() for t in tasks)
                    for task in tasks:
                        task.cancel()
            await everything
        finally:
            stopped.cancel()
            if not everything.done():  # we were cancelled ourselves: take the tasks with us
                for task in tasks:
                    task.cancel()
