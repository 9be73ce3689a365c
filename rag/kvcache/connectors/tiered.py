"""The memory tier: a fast front store (the in-process LRU) over a shared back one (files or Redis),
opened by ``memory+<scheme>://...?mem_bytes=1G`` URLs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats, check_items, check_keys


class TieredStore(KVStore):
    """A fast `front` (usually memory) over a shared `back` (files or Redis).

    Reads try the front, then fetch the rest from the back in one batch and copy back hits into the
    front. Writes go to the back first, then the front.
    """

    kind = "tiered"
    _EXTRA_COUNTERS = ("promotions",)

    def __init__(self, front: KVStore, back: KVStore) -> None:
        super().__init__(f"{front.url}+{back.url}")
        self.front = front
        self.back = back

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = check_keys(keys)
        out = self.front.get_many(keys)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            fill: dict[str, bytes] = {}
            for i, v in zip(missing, self.back.get_many([keys[i] for i in missing]), strict=True):
                if v is not None:
                    out[i] = v
                    fill[keys[i]] = v
            if fill:
                self.front.put_many(fill)
                self._count(promotions=len(fill))
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = dict(check_items(items))
        if not pairs:
            return
        self.back.put_many(pairs)
        self.front.put_many(pairs)
        self._count(puts=len(pairs), bytes_written=sum(len(v) for v in pairs.values()))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = check_keys(keys)
        out = self.front.exists_many(keys)
        missing = [i for i, present in enumerate(out) if not present]
        if missing:
            for i, present in zip(missing, self.back.exists_many([keys[i] for i in missing]), strict=True):
                out[i] = present
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        if not keys:
            return 0
        present = self.exists_many(keys)
        self.back.delete_many(keys)
        self.front.delete_many(keys)
        return sum(present)

    def ping(self) -> bool:
        return self.front.ping() and self.back.ping()

    def stats(self) -> StoreStats:
        """The tier's own counters, with `errors` summed over both tiers (so an outage of the back
        shows at the top level) and each tier's counters under `front` and `back`."""
        out = super().stats()
        out["front"] = self.front.stats()
        out["back"] = self.back.stats()
        out["errors"] = out.get("errors", 0) + out["front"].get("errors", 0) + out["back"].get("errors", 0)
        return out

    def close(self) -> None:
        try:
            self.front.close()
        finally:
            self.back.close()
