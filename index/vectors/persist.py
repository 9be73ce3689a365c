"""The on-disk layout of a vector index, written crash-safely (`kvrag.atomic`).

A folder holds `manifest.json` and the data files of one generation g: the FAISS index
(`index.g.faiss`), the row -> id map (`ids.g.npy`, -1 for deleted rows), the float32 rows
(`vectors.g.f32`), and where used the int8 rescoring codes (`codes.g.i8`), the binary rotation
(`binary_rotation.g.npy`) and the adaptor matrix (`adaptor.g.npy`). The manifest names every file,
so a file may be kept from an older generation: row files grow in place in their own folder, and the
rotation and adaptor never change once written.

Saving writes the data files of generation g+1 beside those of g (never overwriting a file the old
manifest names), then atomically replaces the manifest (the commit point), then removes what no
generation names any more; a crash at any point leaves generation g readable.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from kvrag.atomic import fsync_dir, write_json, write_npy, write_with
from kvrag.errors import CorruptIndexError
from kvrag.index.vectors.rows import RowStore

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ROW_SUFFIX = {"vectors": "f32", "codes": "i8"}  # row files, by role
ARRAY_STEM = {"rotation": "binary_rotation", "adaptor": "adaptor"}  # .npy generation files, by role
_TEMP_FILE = re.compile(
    r"\.(index|ids|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8)\..+\.tmp"
)
_GENERATION_FILE = re.compile(r"(index|ids|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8)")
_READ_ERRORS = (KeyError, TypeError, ValueError, OSError, RuntimeError, MemoryError)


def read_manifest(folder: Path) -> dict:
    """The manifest in `folder`; CorruptIndexError when missing, unreadable or of another format."""
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptIndexError(
            f"no index at {folder} ({MANIFEST} missing): build one with `kvrag index`"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(
            f"{path} is unreadable ({exc}): re-run `kvrag index` to rebuild the index"
        ) from exc
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise CorruptIndexError(f"{path} has an unknown format: re-run `kvrag index` to rebuild the index")
    return m


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Turn any failure to read the index in `folder` back (bad manifest values included, so an
    InvalidInputError of a spec read from it) into CorruptIndexError."""
    try:
        yield
    except CorruptIndexError:
        raise
    except _READ_ERRORS as exc:
        raise CorruptIndexError(
            f"index at {folder} cannot be read ({type(exc).__name__}: {exc}); re-run `kvrag index` to rebuild it"
        ) from exc


def inconsistent(folder: Path) -> CorruptIndexError:
    return CorruptIndexError(f"index at {folder} is inconsistent with its manifest: re-run `kvrag index`")


def saved_ids(folder: Path) -> np.ndarray:
    """The live ids of the index saved in `folder`, from its manifest and id map alone (no FAISS
    load). Raises CorruptIndexError when they cannot be read."""
    m = read_manifest(folder)
    try:
        ids = np.load(folder / m["files"]["ids"], allow_pickle=False)
    except (KeyError, TypeError, ValueError, OSError, EOFError) as exc:
        raise CorruptIndexError(
            f"index at {folder} cannot be read ({type(exc).__name__}: {exc}); re-run `kvrag index`"
        ) from exc
    if ids.ndim != 1 or len(ids) != m.get("rows"):
        raise inconsistent(folder)
    return ids[ids >= 0].astype(np.int64, copy=False)


class IndexFiles:
    """Where an index lives on disk: its folder (None until saved or loaded), its generation, and
    the names of the data files one generation may share with the next, by role (`vectors`,
    `codes`, `rotation`, `adaptor`)."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.generation = 0
        self.names: dict[str, str] = {}
        self._index: str | None = None  # the FAISS index and id map files read by `opened`
        self._ids: str | None = None

    def forget(self, role: str) -> None:
        """The array of `role` changed: the next save writes it under a new name."""
        self.names.pop(role, None)

    # -- writing --------------------------------------------------------------------------------
    def manifest(self, body: dict) -> dict:
        """The manifest of the current generation around `body` (the index's own fields)."""
        gen = self.generation
        return {
            "format_version": FORMAT_VERSION,
            **body,
            "generation": gen,
            "files": {
                "index": f"index.{gen}.faiss",
                "ids": f"ids.{gen}.npy",
                "vectors": self.names.get("vectors"),
                "codes": self.names.get("codes"),
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(
        self,
        folder: Path,
        *,
        rows: dict[str, RowStore | None],
        arrays: dict[str, np.ndarray | None],
        write_index: Callable[[str], None],
        row_ids: np.ndarray,
        body: Callable[[], dict],
    ) -> Path:
        """Write a new generation into `folder`: the row stores and arrays by role (None: not
        used), the FAISS index by `write_index(path)`, the id map, then the manifest around
        `body()` (called once every file has its name)."""
        folder.mkdir(parents=True, exist_ok=True)
        old = read_manifest(folder) if (folder / MANIFEST).exists() else None
        self.generation = max(self.generation, old["generation"] if old else 0) + 1
        gen = self.generation
        same_folder = self.directory is not None and self.directory.resolve() == folder.resolve()
        # Files another generation may reference are never overwritten: row stores grow in place only
        # in their own folder (past the old manifest's row count); anything new gets a fresh name.
        for role, store in rows.items():
            if store is None:
                continue
            if not (
                same_folder and store.path is not None and store.path.parent.resolve() == folder.resolve()
            ):
                self.names[role] = f"{role}.{gen}.{ROW_SUFFIX[role]}"
            store.save_to(folder / self.names[role])
        for role, array in arrays.items():
            if array is not None and not (same_folder and role in self.names):
                self.names[role] = f"{ARRAY_STEM[role]}.{gen}.npy"
                write_npy(folder / self.names[role], array)
        manifest = self.manifest(body())
        write_with(folder / manifest["files"]["index"], write_index)
        write_npy(folder / manifest["files"]["ids"], row_ids)
        write_json(folder / MANIFEST, manifest)  # the commit point
        keep = {*manifest["files"].values(), self.names.get("rotation"), self.names.get("adaptor")}
        for stale in folder.iterdir():
            # older generations, and temporary files of saves that were killed half-way
            if (_GENERATION_FILE.fullmatch(stale.name) and stale.name not in keep) or _TEMP_FILE.fullmatch(
                stale.name
            ):
                stale.unlink(missing_ok=True)
        fsync_dir(folder)
        self.directory = folder
        return folder

    # -- reading (inside `reading(folder)`: failures become CorruptIndexError) -------------------
    @classmethod
    def opened(cls, folder: Path, manifest: dict) -> IndexFiles:
        """The files of the generation `manifest` (read from `folder`) describes."""
        out = cls()
        out.directory, out.generation = folder, int(manifest["generation"])
        files = manifest["files"]
        out.names["vectors"] = _name(files["vectors"])
        if files.get("codes"):
            out.names["codes"] = _name(files["codes"])
        if (manifest.get("binary") or {}).get("rotation"):
            out.names["rotation"] = _name(manifest["binary"]["rotation"])
        if (manifest.get("adaptor") or {}).get("matrix"):
            out.names["adaptor"] = _name(manifest["adaptor"]["matrix"])
        out._index, out._ids = _name(files["index"]), _name(files["ids"])
        return out

    def path(self, role: str) -> Path:
        return self._folder() / self.names[role]

    def read_array(self, role: str) -> np.ndarray | None:
        """The saved array of `role` (rotation, adaptor), None when the index has none."""
        return np.load(self.path(role), allow_pickle=False) if role in self.names else None

    def read_ids(self) -> np.ndarray:
        return np.load(self._folder() / _name(self._ids), allow_pickle=False).astype(np.int64)

    def index_path(self) -> str:
        return str(self._folder() / _name(self._index))

    def rows(self, role: str, dtype: str, dim: int, count: int) -> RowStore:
        """The row store of `role`, memory-mapped from its file."""
        return RowStore(dtype, dim, self.path(role), count)

    def _folder(self) -> Path:
        if self.directory is None:
            raise RuntimeError("these index files were never saved nor opened")
        return self.directory


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"a file name in the manifest is {value!r}")
    return value
