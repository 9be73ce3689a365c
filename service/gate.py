"""Bounded concurrency for model work: a few slots, a bounded queue, 503 beyond it.

Encoding, search, generation and indexing hold a slot; everything else does not. A request that
finds `max_queue` others already waiting, or waits longer than `timeout_s`, gets 503 with
`Retry-After`, so an overloaded server sheds load instead of piling up requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager

from service.errors import Busy


class ModelGate:
    def __init__(self, slots: int, max_queue: int, timeout_s: float):
        if slots < 1 or max_queue < 0 or timeout_s <= 0:
            raise ValueError("slots >= 1, max_queue >= 0 and timeout_s > 0 are required")
        self.slots, self.max_queue, self.timeout_s = slots, max_queue, timeout_s
        self._sem = asyncio.Semaphore(slots)
        self.waiting = 0
        self.running = 0
        self.rejected = 0
        self._avg_s = 1.0  # moving average of slot hold time, for Retry-After

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._avg_s * (self.waiting + 1) / self.slots))

    def check(self) -> None:
        """Raise `Busy` now if a new request would be turned away."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise Busy(
                f"the server is busy ({self.running} running, {self.waiting} waiting); retry later",
                self._retry_after(),
            )

    async def acquire(self) -> float:
        self.check()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._sem.acquire(), self.timeout_s)
        except TimeoutError:
            self.rejected += 1
            raise Busy(
                f"no model slot became free within {self.timeout_s:g} s; retry later", self._retry_after()
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        return time.perf_counter()

    def release(self, started: float) -> None:
        self.running -= 1
        self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - started)
        self._sem.release()

    @asynccontextmanager
    async def slot(self):
        started = await self.acquire()
        try:
            yield
        finally:
            self.release(started)
