"""The `KVStore` interface every connector implements, its counters, and the argument checks they share.

Every store is a cache: a backend failure never raises from get/put/exists/delete. It is logged on the
"kvrag.kvcache" logger, counted in ``errors``, and reads report the keys as missing (None). Counters
(``gets`` = keys asked, ``hits`` + ``misses`` = ``gets``, ``puts``, ``bytes_read``, ``bytes_written``,
``errors``) are kept per store and returned by ``stats()``, with each connector's own after them.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from kvrag.errors import InvalidInputError

log = logging.getLogger("kvrag.kvcache")

StoreStats = dict[str, Any]


def check_keys(keys: Sequence[str]) -> list[str]:
    """`keys` as a list, refusing a single string or keys that are not strings."""
    if isinstance(keys, str | bytes):
        raise InvalidInputError("keys must be a sequence of strings, not a single string")
    out = list(keys)
    for k in out:
        if not isinstance(k, str):
            raise InvalidInputError(f"KV store keys must be strings, got {type(k).__name__}")
    return out


def check_items(items: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """`items` as (key, bytes) pairs; bytearray and memoryview values are copied to bytes."""
    out = []
    for k, v in items.items():
        if not isinstance(k, str):
            raise InvalidInputError(f"KV store keys must be strings, got {type(k).__name__}")
        if isinstance(v, bytearray | memoryview):
            v = bytes(v)
        elif not isinstance(v, bytes):
            raise InvalidInputError(f"KV store values must be bytes, got {type(v).__name__}")
        out.append((k, v))
    return out


class KVStore(ABC):
    """A store of byte blobs under string keys. Reads return None for keys missing or unavailable."""

    kind: ClassVar[str] = "abstract"
    _COUNTERS: ClassVar[tuple[str, ...]] = (
        "gets",
        "hits",
        "misses",
        "puts",
        "bytes_read",
        "bytes_written",
        "errors",
    )
    _EXTRA_COUNTERS: ClassVar[tuple[str, ...]] = ()

    url: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._stats_lock = threading.Lock()
        self._counters = dict.fromkeys(self._COUNTERS + self._EXTRA_COUNTERS, 0)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._counters[name] += delta

    def _count_reads(self, values: Sequence[bytes | None]) -> None:
        hits = [v for v in values if v is not None]
        self._count(
            gets=len(values),
            hits=len(hits),
            misses=len(values) - len(hits),
            bytes_read=sum(len(v) for v in hits),
        )

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in the order of `keys`; None where a key is missing or the backend is unavailable."""

    @abstractmethod
    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store (or overwrite) every item; backend failures are logged and counted, not raised."""

    @abstractmethod
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present (False where the backend is unavailable)."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the keys; return how many were present."""

    def delete(self, keys: Sequence[str]) -> int:
        """Alias of `delete_many`."""
        return self.delete_many(keys)

    @abstractmethod
    def ping(self) -> bool:
        """Whether the backend is reachable and healthy."""

    def stats(self) -> StoreStats:
        """Counters plus `kind` and `url`."""
        with self._stats_lock:
            return {"kind": self.kind, "url": self.url, **self._counters}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the store is not used afterwards."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
