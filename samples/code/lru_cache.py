"""A small least-recently-used (LRU) cache.

The cache keeps at most ``capacity`` entries. Every successful lookup or
insert marks the key as the most recently used one; when the cache is full,
inserting a new key evicts the entry that has gone unused the longest.

The implementation relies on :class:`collections.OrderedDict`, which keeps
keys in insertion order and can move a key to either end in constant time.
"""

from collections import OrderedDict
from typing import Any, Hashable, Optional


class LRUCache:
    """A fixed-size mapping that evicts the least recently used key.

    The cache also counts hits and misses so that its hit ratio can be
    inspected after a workload has run.
    """

    def __init__(self, capacity: int) -> None:
        """Create an empty cache that holds at most ``capacity`` entries.

        Raises:
            ValueError: if ``capacity`` is smaller than 1.
        """
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._data: "OrderedDict[Hashable, Any]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, default: Optional[Any] = None) -> Any:
        """Return the value stored for ``key``, or ``default`` if absent.

        A hit moves ``key`` to the most recently used position.
        """
        if key not in self._data:
            self.misses += 1
            return default
        self.hits += 1
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Hashable, value: Any) -> Optional[Hashable]:
        """Store ``value`` under ``key`` and mark it as most recently used.

        Returns:
            The key that was evicted to make room, or ``None`` if nothing
            was evicted.
        """
        if key in self._data:
            self._data.move_to_end(key)
            self._data[key] = value
            return None
        self._data[key] = value
        if len(self._data) > self.capacity:
            evicted, _ = self._data.popitem(last=False)
            return evicted
        return None

    def hit_ratio(self) -> float:
        """Return hits divided by all lookups, or 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def keys(self) -> list:
        """Return the keys from least to most recently used."""
        return list(self._data.keys())

    def __len__(self) -> int:
        """Return the number of entries currently stored."""
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Return True if ``key`` is cached; does not change the order."""
        return key in self._data


if __name__ == "__main__":
    cache = LRUCache(capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")                 # "a" becomes most recently used
    evicted = cache.put("c", 3)    # so "b" is evicted
    print("evicted:", evicted)
    print("keys:", cache.keys())
    print("get b:", cache.get("b"))
    print(f"hit ratio: {cache.hit_ratio():.2f}")
