"""The file connector (``file:///abs/path``): one file per key, written atomically (temp + rename)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvrag.atomic import write_bytes
from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.base import KVStore, check_items, check_keys, log
from kvrag.rag.kvcache.connectors.spec import StoreSpec


class FileStore(KVStore):
    """One file per key: ``root/<sha1(key)[:2]>/<sha256(key)>.kv``, written atomically (temp + rename)."""

    kind = "file"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot create the KV store folder {self.root}: {exc}") from None
        super().__init__(self.root.as_uri())

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> FileStore:
        return cls(Path(spec.path))

    def path_for(self, key: str) -> Path:
        """The file that holds `key`."""
        raw = key.encode("utf-8", "surrogatepass")
        return self.root / hashlib.sha1(raw).hexdigest()[:2] / f"{hashlib.sha256(raw).hexdigest()}.kv"

    def _error(self, op: str, path: Path, exc: OSError) -> None:
        log.warning("file KV store %s: %s of %s failed: %s", self.url, op, path, exc)
        self._count(errors=1)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in check_keys(keys):
            path = self.path_for(k)
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:
                self._error("read", path, exc)
                out.append(None)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        for k, v in check_items(items):
            path = self.path_for(k)
            try:
                write_bytes(path, v)
            except OSError as exc:
                self._error("write", path, exc)
                continue
            self._count(puts=1, bytes_written=len(v))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.path_for(k).is_file() for k in check_keys(keys)]

    def delete_many(self, keys: Sequence[str]) -> int:
        removed = 0
        for k in check_keys(keys):
            path = self.path_for(k)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error("delete", path, exc)
        return removed

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)
