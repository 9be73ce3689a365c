"""The in-process connector: an LRU bounded by the total size of its values (``memory://?max_bytes=2G``),
also the front of the memory tier (``memory+...`` URLs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats, check_items, check_keys
from kvrag.rag.kvcache.connectors.spec import DEFAULT_MEMORY_BYTES, StoreSpec


class MemoryStore(KVStore):
    """An in-process LRU bounded by the total size of its values. Thread-safe.

    A get refreshes a key's recency (exists does not); a value larger than `max_bytes` is not stored.
    """

    kind = "memory"
    _EXTRA_COUNTERS = ("evictions",)

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidInputError(f"max_bytes must be a positive int, got {max_bytes!r}")
        super().__init__(f"memory://?max_bytes={max_bytes}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._mu = threading.Lock()

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> MemoryStore:
        return cls(spec.max_bytes if spec.max_bytes is not None else DEFAULT_MEMORY_BYTES)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = check_keys(keys)
        out: list[bytes | None] = []
        with self._mu:
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                out.append(v)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = check_items(items)
        stored = written = evicted = 0
        with self._mu:
            for k, v in pairs:
                old = self._data.pop(k, None)
                if old is not None:
                    self._size -= len(old)
                if len(v) > self.max_bytes:
                    continue
                self._data[k] = v
                self._size += len(v)
                stored += 1
                written += len(v)
                while self._size > self.max_bytes:
                    _, dropped = self._data.popitem(last=False)
                    self._size -= len(dropped)
                    evicted += 1
        self._count(puts=stored, bytes_written=written, evictions=evicted)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = check_keys(keys)
        with self._mu:
            return [k in self._data for k in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        removed = 0
        with self._mu:
            for k in keys:
                v = self._data.pop(k, None)
                if v is not None:
                    self._size -= len(v)
                    removed += 1
        return removed

    def ping(self) -> bool:
        return True

    def stats(self) -> StoreStats:
        out = super().stats()
        with self._mu:
            out.update(entries=len(self._data), bytes_used=self._size, max_bytes=self.max_bytes)
        return out

    def close(self) -> None:
        with self._mu:
            self._data.clear()
            self._size = 0
