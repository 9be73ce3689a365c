"""Bounded concurrency for model work: a few slots, a bounded queue, 503 beyond it.

Encoding, search, generation and indexing hold a slot; everything else does not. A request that
finds `max_queue` others already waiting, or waits longer than `timeout_s`, gets 503 with
`Retry-After`, so an overloaded server sheds load instead of piling up requests.

Every slot and collection lock remembers since when it is held, so `/readyz` can report a server
whose model work has stopped moving (a slot or lock held far longer than any request takes).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from contextlib import asynccontextmanager

from kvrag.service.errors import Busy


class ModelGate:
    """Model work slots. `acquire` returns a ticket that `release` takes back exactly once."""

    def __init__(self, slots: int, max_queue: int, timeout_s: float):
        if slots < 1 or max_queue < 0 or timeout_s <= 0:
            raise ValueError("slots >= 1, max_queue >= 0 and timeout_s > 0 are required")
        self.slots, self.max_queue, self.timeout_s = slots, max_queue, timeout_s
        self._sem = asyncio.Semaphore(slots)
        self.waiting = 0
        self.rejected = 0
        self._avg_s = 1.0  # moving average of slot hold time, for Retry-After
        self._held: dict[int, float] = {}  # ticket -> monotonic time the slot was taken
        self._tickets = itertools.count(1)

    @property
    def running(self) -> int:
        return len(self._held)

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

    async def acquire(self) -> int:
        self.check()
        self.waiting += 1
        try:
            # asyncio.timeout, not wait_for: a cancellation that races the acquisition cannot leak
            # a permit (Semaphore.acquire gives it back when cancelled after being woken)
            async with asyncio.timeout(self.timeout_s):
                await self._sem.acquire()
        except TimeoutError:
            self.rejected += 1
            raise Busy(
                f"no model slot became free within {self.timeout_s:g} s; retry later", self._retry_after()
            ) from None
        finally:
            self.waiting -= 1
        ticket = next(self._tickets)
        self._held[ticket] = time.monotonic()
        return ticket

    def release(self, ticket: int) -> None:
        """Give a slot back; a ticket released twice is ignored (the slot is not freed twice)."""
        started = self._held.pop(ticket, None)
        if started is None:
            return
        self._avg_s = 0.8 * self._avg_s + 0.2 * (time.monotonic() - started)
        self._sem.release()

    def oldest_hold_s(self) -> float:
        """How long the longest-held slot has been held (0 when none is)."""
        now = time.monotonic()
        return max((now - t for t in list(self._held.values())), default=0.0)

    @asynccontextmanager
    async def slot(self):
        ticket = await self.acquire()
        try:
            yield
        finally:
            self.release(ticket)


class TrackedLock:
    """A `threading.Lock` that remembers since when it is held (for `/readyz`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.since = time.monotonic()
        return ok

    def release(self) -> None:
        self.since = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def held_s(self) -> float:
        since = self.since
        return time.monotonic() - since if since is not None else 0.0

    def __enter__(self) -> TrackedLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
