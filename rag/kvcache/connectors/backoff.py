"""The back-off the Redis connectors share: a target that fails as *down* is not asked again for a while.

A target is a name: ``""`` for a whole store, a node's ``host:port`` in a cluster. After a failure that
means the target is down (connection refused or reset, timeout, ``CLUSTERDOWN``), every call for it is
answered at once as unavailable for `retry_after` seconds (counted in ``skipped``), so that a dead server
costs one timeout per window, not one per request. Other failures (an error reply) are counted and logged
but do not back off. A success ends a target's back-off early.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from kvrag.rag.kvcache.connectors.base import log

STORE = ""  # the target that stands for the whole store


class _Counting(Protocol):
    url: str

    def _count(self, **deltas: int) -> None: ...


def redis_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(every failure a Redis call may raise, the ones that mean the server or node is down)."""
    from redis import exceptions as e

    errors = (e.RedisError, e.RedisClusterException, OSError)
    down = (e.ConnectionError, e.TimeoutError, e.ClusterDownError, OSError)
    return errors, down


class Backoff:
    """Back-off windows per target, with the failure accounting of one store (thread-safe).

    `owner` is the store: its ``errors`` and ``skipped`` counters are updated and its printable URL is
    in every log line; `label` names the store kind in them ("Redis", "Redis Cluster").
    """

    def __init__(
        self,
        owner: _Counting,
        label: str,
        retry_after: float,
        down: tuple[type[BaseException], ...],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.owner = owner
        self.label = label
        self.retry_after = retry_after
        self.down_errors = down
        self.clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def blocked(self, target: str = STORE) -> bool:
        """Whether `target` is backed off now (nothing is counted)."""
        with self._lock:
            return self.clock() < self._until.get(target, 0.0)

    def allow(self, target: str = STORE) -> bool:
        """Whether to ask `target` now; a call refused is counted in ``skipped``."""
        if self.blocked(target):
            self.owner._count(skipped=1)
            return False
        return True

    def backed_off(self) -> list[str]:
        """The targets (other than the whole store) backed off now, sorted."""
        now = self.clock()
        with self._lock:
            return sorted(t for t, until in self._until.items() if t != STORE and until > now)

    def succeeded(self, target: str = STORE) -> None:
        """End `target`'s back-off (the whole store's one as well when `target` is the store)."""
        with self._lock:
            self._until.pop(target, None)

    def failed(self, op: str, exc: BaseException, target: str = STORE, *, down: bool = False) -> bool:
        """Count and log a failure of `op`; back `target` off when `exc` means it is down (or `down` says
        so whatever the error). Returns whether it was backed off."""
        self.owner._count(errors=1)
        where = f"{self.label} KV store {self.owner.url}"
        node = f": node {target}" if target != STORE else ""
        if down or isinstance(exc, self.down_errors):
            with self._lock:
                self._until[target] = self.clock() + self.retry_after
            what = "its keys are misses" if target != STORE else "treating it as a miss"
            log.warning(
                "%s%s unavailable (%s: %s: %s); %s for %.1f s",
                where,
                node,
                op,
                type(exc).__name__,
                exc,
                what,
                self.retry_after,
            )
            return True
        on = f" on node {target}" if target != STORE else ""
        log.warning("%s: %s%s failed: %s: %s", where, op, on, type(exc).__name__, exc)
        return False
