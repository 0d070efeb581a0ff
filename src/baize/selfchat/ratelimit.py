"""Async token bucket: the requests-per-minute and tokens-per-minute limits, enforced on our side of the wire."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """`rate` units per second, at most `capacity` saved up. `acquire(n)` waits until n units are there.

    Waiters are served in order (one lock), so a big request is not starved by small ones. `debit(n)` charges
    units after the fact (the real token count of a reply); the bucket may go negative and then refills.
    """

    def __init__(self, rate_per_s: float, capacity: float):
        self.rate = rate_per_s
        self.capacity = max(capacity, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    @classmethod
    def per_minute(cls, limit: float, burst_s: float = 1.0) -> TokenBucket:
        return cls(limit / 60.0, limit / 60.0 * burst_s)

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, n: float = 1.0) -> None:
        n = min(n, self.capacity)  # a request bigger than the bucket waits for a full bucket, not forever
        async with self._lock:
            while True:
                self._refill()
                if self.level >= n:
                    self.level -= n
                    return
                await asyncio.sleep((n - self.level) / self.rate)

    def debit(self, n: float) -> None:
        self._refill()
        self.level -= n
