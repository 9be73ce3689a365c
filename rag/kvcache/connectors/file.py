"""The file connector (``file:///abs/path?max_bytes=20G``): one file per key, written atomically (temp +
rename), optionally held within a byte budget by deleting the least recently used files.

Recency is the file's modification time: a write sets it, a read (hit) sets it again (``os.utime``, the
file itself is not touched; done by stores without a budget too, for those that share the folder),
`exists_many` leaves it. With a budget the store keeps an index of its files
(path -> size, mtime), filled by one scan of the folder on first need and kept up to date by its own
puts, gets and deletes; a heap over the index (stale entries skipped, compacted as it grows) gives the
oldest file in O(log n). Before each file is written, the oldest files are deleted until the new one fits,
never the files written by the same `put_many` call: a value that does not fit (larger than the budget, or
a call whose values together exceed it) is not stored, and the key's older value is removed.

Several processes (an indexing job and a server) may share the folder. Each checks a file before deleting
it: one already gone is dropped from its index, one read or rewritten by another process since (a newer
mtime) is kept and requeued. Files the others write are counted when read, and at the next rescan, done
once this store has written `rescan_bytes` since the last (default: a sixteenth of the budget, so a scan
costs about 16 stats per file written, and the folder overshoots the budget by about what the other
processes wrote in that time).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvrag.atomic import atomic_path, write_bytes
from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats, check_items, check_keys, log
from kvrag.rag.kvcache.connectors.spec import StoreSpec

RESCAN_SHARE = 16  # rescan after writing max_bytes / RESCAN_SHARE
_PENDING = -1  # the mtime of an entry being written: counted in the total, never evicted

# index entry: (size, mtime_ns, seq); heap entry: (mtime_ns, seq, path), valid while seq matches the index
_Entry = tuple[int, int, int]


class FileStore(KVStore):
    """One file per key: ``root/<sha1(key)[:2]>/<sha256(key)>.kv``, written atomically (temp + rename).

    With `max_bytes`, the files' total size is kept within it by deleting the least recently used (see the
    module's docstring); without it the folder grows without bound. Thread-safe.
    """

    kind = "file"
    _EXTRA_COUNTERS = ("evicted", "skipped")

    def __init__(
        self, root: str | os.PathLike, max_bytes: int | None = None, *, rescan_bytes: int | None = None
    ) -> None:
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
        ):
            raise InvalidInputError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if rescan_bytes is not None and (
            isinstance(rescan_bytes, bool) or not isinstance(rescan_bytes, int) or rescan_bytes <= 0
        ):
            raise InvalidInputError(f"rescan_bytes must be a positive int or None, got {rescan_bytes!r}")
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot create the KV store folder {self.root}: {exc}") from None
        url = self.root.as_uri()
        super().__init__(url if max_bytes is None else f"{url}?max_bytes={max_bytes}")
        self.max_bytes = max_bytes
        if rescan_bytes is None and max_bytes is not None:
            rescan_bytes = max(1, max_bytes // RESCAN_SHARE)
        self.rescan_bytes = rescan_bytes
        self._mu = threading.Lock()
        self._index: dict[str, _Entry] | None = None  # None until the first scan
        self._heap: list[tuple[int, int, str]] = []
        self._total = 0
        self._seq = 0
        self._written_since_scan = 0

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> FileStore:
        return cls(Path(spec.path), spec.max_bytes)

    def path_for(self, key: str) -> Path:
        """The file that holds `key`."""
        raw = key.encode("utf-8", "surrogatepass")
        return self.root / hashlib.sha1(raw).hexdigest()[:2] / f"{hashlib.sha256(raw).hexdigest()}.kv"

    def _error(self, op: str, path: str | Path, exc: OSError) -> None:
        log.warning("file KV store %s: %s of %s failed: %s", self.url, op, path, exc)
        self._count(errors=1)

    # ------------------------------------------------------------------------------------ the index
    # Everything below that touches the index, the heap or the total runs under self._mu; the total is
    # always the sum of the index's sizes, and the index is brought back in line with the disk as
    # differences show up (eviction checks, reads, rescans).

    def _track(self, path: str, size: int, mtime: int) -> None:
        assert self._index is not None
        old = self._index.get(path)
        self._total += size - (old[0] if old else 0)
        self._seq += 1
        self._index[path] = (size, mtime, self._seq)
        if mtime != _PENDING:
            heapq.heappush(self._heap, (mtime, self._seq, path))
            if len(self._heap) > 2 * len(self._index) + 64:
                self._rebuild_heap()

    def _untrack(self, path: str) -> _Entry | None:
        assert self._index is not None
        old = self._index.pop(path, None)
        if old is not None:
            self._total -= old[0]
        return old

    def _rebuild_heap(self) -> None:
        assert self._index is not None
        self._heap = [(m, q, p) for p, (_, m, q) in self._index.items() if m != _PENDING]
        heapq.heapify(self._heap)

    def _scan(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every value file in the folder's layout (temp files left out)."""
        found: dict[str, tuple[int, int]] = {}
        try:
            tops = [
                e.path for e in os.scandir(self.root) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)
            ]
        except OSError as exc:
            self._error("scan", self.root, exc)
            return found
        for top in tops:
            try:
                with os.scandir(top) as entries:
                    for e in entries:
                        if e.name.startswith(".") or not e.name.endswith(".kv"):
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if e.is_file(follow_symlinks=False):
                            found[e.path] = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._error("scan", top, exc)
        return found

    def _rescan(self) -> None:
        """Rebuild the index from the folder, keeping the entries being written."""
        found = self._scan()
        pending = {p: e for p, e in (self._index or {}).items() if e[1] == _PENDING}
        self._index, self._total, self._written_since_scan = {}, 0, 0
        for path, (size, mtime) in sorted(found.items(), key=lambda item: item[1][1]):
            if path not in pending:
                self._seq += 1
                self._index[path] = (size, mtime, self._seq)
                self._total += size
        for path, entry in pending.items():
            self._index[path] = entry
            self._total += entry[0]
        self._rebuild_heap()

    def _evict_until(self, limit: int, keep: set[str]) -> bool:
        """Delete the least recently used files (none in `keep`) until the total is within `limit`."""
        assert self._index is not None
        held: list[tuple[int, int, str]] = []
        evicted = 0
        while self._total > limit and self._heap:
            item = heapq.heappop(self._heap)
            mtime, seq, path = item
            entry = self._index.get(path)
            if entry is None or entry[2] != seq:
                continue  # superseded by a later read or write
            if path in keep:
                held.append(item)
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._untrack(path)  # deleted by another process
                continue
            except OSError as exc:
                self._error("stat", path, exc)
                self._untrack(path)
                continue
            if st.st_mtime_ns > mtime or st.st_size != entry[0]:
                self._track(path, st.st_size, st.st_mtime_ns)  # read or rewritten elsewhere since
                continue
            try:
                os.unlink(path)
                evicted += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error("evict", path, exc)
            self._untrack(path)
        for item in held:
            heapq.heappush(self._heap, item)
        if evicted:
            self._count(evicted=evicted)
        return self._total <= limit

    def _reserve(self, path: str, size: int, keep: set[str]) -> tuple[bool, _Entry | None]:
        """Make room for `size` bytes at `path` and count them as being written; (fits, the old entry)."""
        assert self.max_bytes is not None and self.rescan_bytes is not None
        if self._index is None or self._written_since_scan >= self.rescan_bytes:
            self._rescan()
        old = self._untrack(path)
        if size > self.max_bytes or not self._evict_until(self.max_bytes - size, keep):
            return False, old
        self._track(path, size, _PENDING)
        return True, old

    def _touched(self, path: str, size: int, mtime: int) -> None:
        """Record a read of `path` (a file this process may not know of yet)."""
        with self._mu:
            if self._index is not None:
                entry = self._index.get(path)
                if entry is None or entry[1] != _PENDING:
                    self._track(path, size, mtime)

    # ---------------------------------------------------------------------------------------- KVStore

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in check_keys(keys):
            path = self.path_for(k)
            try:
                value = path.read_bytes()
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError as exc:
                self._error("read", path, exc)
                out.append(None)
                continue
            out.append(value)
            now = time.time_ns()
            try:
                os.utime(path, ns=(now, now))
            except OSError:
                continue  # gone since, or a read-only folder: the value is still good
            if self.max_bytes is not None:
                self._touched(str(path), len(value), now)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = check_items(items)
        if self.max_bytes is None:
            for k, v in pairs:
                path = self.path_for(k)
                try:
                    write_bytes(path, v)
                except OSError as exc:
                    self._error("write", path, exc)
                    continue
                self._count(puts=1, bytes_written=len(v))
            return
        keep: set[str] = set()
        for k, v in pairs:
            path = str(self.path_for(k))
            keep.add(path)
            with self._mu:
                fits, old = self._reserve(path, len(v), keep)
            if not fits:
                self._count(skipped=1)
                self._remove(path)
                continue
            now = time.time_ns()
            try:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(v)
                    os.utime(tmp, ns=(now, now))
            except OSError as exc:
                self._error("write", path, exc)
                with self._mu:
                    self._untrack(path)
                    if old is not None and old[1] != _PENDING:
                        self._track(path, old[0], old[1])  # the old file is still there
                continue
            with self._mu:
                if self._index is not None:
                    self._track(path, len(v), now)
                self._written_since_scan += len(v)
            self._count(puts=1, bytes_written=len(v))

    def _remove(self, path: str | Path) -> bool:
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            removed = False
        except OSError as exc:
            self._error("delete", path, exc)
            return False
        if self.max_bytes is not None:
            with self._mu:
                if self._index is not None:
                    self._untrack(str(path))
        return removed

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.path_for(k).is_file() for k in check_keys(keys)]

    def delete_many(self, keys: Sequence[str]) -> int:
        return sum(self._remove(self.path_for(k)) for k in check_keys(keys))

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)

    def stats(self) -> StoreStats:
        """Counters; with a budget also `max_bytes`, `bytes` (the files' total as tracked) and `files`."""
        out = super().stats()
        if self.max_bytes is None:
            for name in self._EXTRA_COUNTERS:
                out.pop(name, None)
            return out
        with self._mu:
            if self._index is None:
                self._rescan()
            out.update(max_bytes=self.max_bytes, bytes=self._total, files=len(self._index or ()))
        return out
