"""Append-only fixed-width rows (the float32 vectors and int8 codes an index rescores against)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kvrag.atomic import write_with
from kvrag.errors import CorruptIndexError


class RowStore:
    """Append-only fixed-width rows, either in RAM or in a file that is memory-mapped for reads."""

    def __init__(self, dtype: str, dim: int, path: Path | None = None, count: int = 0):
        self.dtype, self.dim, self.path, self.count = np.dtype(dtype), dim, path, count
        self._ram: list[np.ndarray] = []
        self._map: np.ndarray | None = None
        if path is not None:
            size = path.stat().st_size if path.exists() else 0
            if size < count * self.row_bytes:
                raise CorruptIndexError(f"{path} holds fewer rows than the manifest says: rebuild the index")

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.path is None:
            self._ram.append(rows)
        else:
            mode = "r+b" if self.path.exists() else "w+b"
            with open(self.path, mode) as fh:
                # Bytes past `count` are left-overs of an append that was never saved: overwrite them.
                fh.seek(self.count * self.row_bytes)
                fh.write(rows.tobytes())
                fh.truncate()
            self._map = None
        self.count += len(rows)

    def array(self) -> np.ndarray:
        """All rows; a read-only memory map when file-backed."""
        if self.path is None:
            if len(self._ram) != 1:
                self._ram = [np.concatenate(self._ram) if self._ram else np.zeros((0, self.dim), self.dtype)]
            return self._ram[0]
        if self._map is None or len(self._map) != self.count:
            if self.count == 0:
                return np.zeros((0, self.dim), self.dtype)
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count, self.dim))
        return self._map

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array()[np.sort(rows)][np.argsort(np.argsort(rows))])

    def save_to(self, path: Path) -> None:
        """Make `path` hold exactly these rows (durably), and read from it from now on."""
        if self.path is not None and self.path.resolve() == path.resolve():
            with open(path, "r+b") as fh:
                fh.truncate(self.count * self.row_bytes)
                os.fsync(fh.fileno())
            return
        data = np.ascontiguousarray(self.array())
        write_with(path, lambda tmp: data.tofile(tmp))
        self.path, self._ram, self._map = path, [], None
