"""The on-disk layout of a vector index, written crash-safely (`kvrag.atomic`).

A folder holds `manifest.json` and the data files it names: the FAISS index (`index.c.faiss`) and
the row -> id map (`ids.c.npy`, -1 for deleted rows) written by the last compaction c, the id log
(`idlog.g.i64`) of what changed since, the float32 rows (`vectors.g.f32`), and where used the int8
rescoring codes (`codes.g.i8`), the binary rotation (`binary_rotation.g.npy`) and the adaptor matrix
(`adaptor.g.npy`). A file may be kept from an older generation: row files and the id log grow in
place in their own folder, and the FAISS file, the id map, the rotation and the adaptor never change
once written.

Incremental saves. Rewriting the FAISS index and the id map on every save costs O(N) for a write of
one passage. A save therefore only appends to the id log the (row, id) pairs of the rows added since
the last save and (row, -1) for the rows deleted since: the manifest's `faiss_rows` says how many
rows the FAISS file holds, `log_entries` how many log entries are valid. Loading reads the FAISS file
and the id map, replays the log over the map, and re-adds the rows past `faiss_rows` to FAISS from
the stored float rows, quantised as `add` quantises them (see `VectorIndex.load`); deletions need no
FAISS change, as searches skip deleted rows (binary IVF, which drops them, removes them on load).
A compaction, which writes the FAISS index and the id map whole and starts an empty log, happens
when the log would pass `Compaction.limit` (a fraction of the rows in the FAISS file, within fixed
bounds, so that load time stays bounded and the O(N) rewrite is amortised over many writes), when
the codec was re-calibrated, when the index is saved to another folder, or when asked for.

Saving writes the data files of generation g+1 beside those of g (never overwriting bytes the old
manifest names: logs and row files only grow past the counts it records), then atomically replaces
the manifest (the commit point), then removes what no generation names any more; a crash at any
point leaves generation g readable.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.atomic import fsync_dir, write_json, write_npy, write_with
from kvrag.errors import CorruptIndexError
from kvrag.index.vectors.rows import RowStore

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the id log (`faiss_rows`, `files.idlog`, `log_entries`)
READABLE_VERSIONS = (1, 2)  # a version-1 manifest is a compacted index: no log, faiss_rows == rows
ROW_SUFFIX = {"vectors": "f32", "codes": "i8", "idlog": "i64"}  # files that grow in place, by role
ARRAY_STEM = {"rotation": "binary_rotation", "adaptor": "adaptor"}  # .npy generation files, by role
_TEMP_FILE = re.compile(
    r"\.(index|ids|idlog|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8|i64)\..+\.tmp"
)
_GENERATION_FILE = re.compile(
    r"(index|ids|idlog|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8|i64)"
)
_READ_ERRORS = (KeyError, TypeError, ValueError, OSError, EOFError, RuntimeError, MemoryError)


@dataclass(frozen=True)
class Compaction:
    """When a save rewrites the FAISS index and the id map whole instead of appending to the id log:
    once the log would hold more than `fraction` of the rows in the FAISS file, at least `min_rows`
    and at most `max_rows` entries. The fraction amortises the O(N) rewrite (one per N * fraction
    changed rows); `max_rows` bounds what a load re-adds to FAISS (an HNSW insert is not free), and
    `min_rows` spares small indexes a rewrite on every save."""

    fraction: float = 0.1
    min_rows: int = 128
    max_rows: int = 20_000

    def limit(self, faiss_rows: int) -> int:
        """The most log entries an index whose FAISS file holds `faiss_rows` rows keeps."""
        return int(min(self.max_rows, max(self.min_rows, self.fraction * faiss_rows)))


EVERY_SAVE = Compaction(0.0, 0, 0)  # rewrite on every save that changed anything: the layout before logs


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
    if not isinstance(m, dict) or m.get("format_version") not in READABLE_VERSIONS:
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
    """The live ids of the index saved in `folder`, from its manifest, id map and id log alone (no
    FAISS load). Raises CorruptIndexError when they cannot be read."""
    m = read_manifest(folder)
    with reading(folder):
        files = IndexFiles.opened(folder, m)
        ids = files.read_row_ids(int(m["rows"]))
    return ids[ids >= 0]


def replay(base: np.ndarray, log: np.ndarray, faiss_rows: int, rows: int) -> np.ndarray:
    """The row -> id map of `rows` rows: the compacted map `base` (one id a row of the FAISS file),
    then the log's (row, id) entries: ids of rows added past the base, and -1 for deleted rows.
    A deleted row never comes back, so adds are applied before deletions whatever their order.
    ValueError when the pieces do not fit together."""
    if (
        base.ndim != 1
        or base.dtype.kind not in "iu"
        or len(base) != faiss_rows
        or not 0 <= faiss_rows <= rows
    ):
        raise ValueError(f"the id map holds {base.shape} ids for {faiss_rows} of {rows} rows")
    ids = np.full(rows, -1, dtype=np.int64)
    ids[:faiss_rows] = base
    if len(log):
        row, value = log[:, 0], log[:, 1]
        added = value >= 0
        if (row < 0).any() or (row >= rows).any() or (row[added] < faiss_rows).any():
            raise ValueError("the id log names rows outside the index")
        ids[row[added]] = value[added]
        ids[row[~added]] = -1
    return ids


class IndexFiles:
    """Where an index lives on disk: its folder (None until saved or loaded), its generation, the
    names of the data files one generation may share with the next, by role (`index`, `ids`,
    `idlog`, `vectors`, `codes`, `rotation`, `adaptor`), and what the saved FAISS file and id log
    hold (`faiss_rows`, `log`, `saved_rows`: the rows of the id map when last saved or loaded)."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.generation = 0
        self.names: dict[str, str] = {}
        self.faiss_rows = 0
        self.saved_rows = 0
        self.log: RowStore | None = None  # the saved id log: int64 (row, id) pairs
        self.log_entries = 0  # how many of its entries the saved manifest counts
        self._index_changed = True  # the saved FAISS file no longer encodes the rows as `add` would

    def forget(self, role: str) -> None:
        """The array of `role` changed: the next save writes it under a new name (and, as the codec
        changed, compacts)."""
        self.names.pop(role, None)
        self._index_changed = True

    def index_changed(self) -> None:
        """The codec was re-calibrated: the next save writes the FAISS index whole."""
        self._index_changed = True

    # -- writing --------------------------------------------------------------------------------
    def manifest(self, body: dict) -> dict:
        """The manifest of the current generation around `body` (the index's own fields)."""
        return self._manifest(body, self._files(), self.faiss_rows, self.log_entries)

    def _files(self, **changes: str | None) -> dict[str, str | None]:
        names = {**self.names, **changes}
        return {role: names.get(role) for role in ("index", "ids", "idlog", "vectors", "codes")}

    def _manifest(self, body: dict, files: dict, faiss_rows: int, log_entries: int) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **body,
            "faiss_rows": faiss_rows,
            "log_entries": log_entries,
            "generation": self.generation,
            "files": files,
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
        removed_rows: np.ndarray,
        body: Callable[[], dict],
        compaction: Compaction,
        compact: bool = False,
    ) -> bool:
        """Write a new generation into `folder`: the row stores and arrays by role (None: not
        used), then either the id log entries of what changed since the last save (`removed_rows`:
        rows deleted since, in any order) or, compacting, the FAISS index by `write_index(path)` and
        the id map `row_ids`; then the manifest around `body()` (called once every file has its
        name). Returns whether it compacted."""
        folder.mkdir(parents=True, exist_ok=True)
        old = read_manifest(folder) if (folder / MANIFEST).exists() else None
        self.generation = max(self.generation, old["generation"] if old else 0) + 1
        gen = self.generation
        same_folder = self.directory is not None and self.directory.resolve() == folder.resolve()
        n = len(row_ids)
        entries = self._entries(row_ids, removed_rows) if same_folder and self.saved_rows <= n else None
        compact = (
            compact
            or entries is None
            or self._index_changed
            or "index" not in self.names
            or self.log_entries + len(entries) > compaction.limit(self.faiss_rows)
        )
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
        log: RowStore | None = None
        if compact:
            files = self._files(index=f"index.{gen}.faiss", ids=f"ids.{gen}.npy", idlog=None)
            faiss_rows = n
            write_with(folder / f"index.{gen}.faiss", write_index)
            write_npy(folder / f"ids.{gen}.npy", row_ids)
        else:
            assert entries is not None
            log = self.log if self.log is not None or not len(entries) else RowStore("int64", 2)
            name = None
            if log is not None:
                log.count = self.log_entries  # past it: entries of a save that never committed
                log.append(entries)
                name = self.names.get("idlog") or f"idlog.{gen}.{ROW_SUFFIX['idlog']}"
                log.save_to(folder / name)
            files = self._files(idlog=name)
            faiss_rows = self.faiss_rows
        manifest = self._manifest(body(), files, faiss_rows, log.count if log is not None else 0)
        write_json(folder / MANIFEST, manifest)  # the commit point
        self.names.update({role: name for role, name in files.items() if name})
        if log is None:
            self.names.pop("idlog", None)
        self.log, self.log_entries = log, (log.count if log is not None else 0)
        self.faiss_rows, self.saved_rows, self._index_changed = faiss_rows, n, False
        self.directory = folder
        self._remove_unnamed(folder, {*files.values(), self.names.get("rotation"), self.names.get("adaptor")})
        return compact

    def _entries(self, row_ids: np.ndarray, removed_rows: np.ndarray) -> np.ndarray:
        """The id log entries of a save: (row, id) of the rows added since the last one (id -1 when
        deleted meanwhile), then (row, -1) of the older rows deleted since."""
        new = np.arange(self.saved_rows, len(row_ids), dtype=np.int64)
        gone = np.unique(np.asarray(removed_rows, dtype=np.int64))
        gone = gone[gone < self.saved_rows]
        return np.concatenate(
            [np.stack([new, row_ids[new]], axis=1), np.stack([gone, np.full_like(gone, -1)], axis=1)]
        )

    @staticmethod
    def _remove_unnamed(folder: Path, keep: set[str | None]) -> None:
        """Remove older generations' files and temporary files of saves killed half-way."""
        removed = False
        for stale in folder.iterdir():
            name = stale.name
            if (_GENERATION_FILE.fullmatch(name) and name not in keep) or _TEMP_FILE.fullmatch(name):
                stale.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(folder)

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
        out.names["index"], out.names["ids"] = _name(files["index"]), _name(files["ids"])
        out.saved_rows = int(manifest["rows"])
        out.faiss_rows = int(manifest.get("faiss_rows", out.saved_rows))
        if files.get("idlog"):
            out.names["idlog"] = _name(files["idlog"])
            out.log_entries = int(manifest["log_entries"])
            out.log = out.rows("idlog", "int64", 2, out.log_entries)
        out._index_changed = False
        return out

    def path(self, role: str) -> Path:
        return self._folder() / self.names[role]

    def read_array(self, role: str) -> np.ndarray | None:
        """The saved array of `role` (rotation, adaptor), None when the index has none."""
        return np.load(self.path(role), allow_pickle=False) if role in self.names else None

    def read_ids(self) -> np.ndarray:
        """The compacted id map: one id (or -1) for each row of the FAISS file."""
        return np.load(self.path("ids"), allow_pickle=False).astype(np.int64)

    def read_row_ids(self, rows: int, base: np.ndarray | None = None) -> np.ndarray:
        """The id map of all `rows` rows: the compacted map (`base`, read when None) with the id log
        replayed over it."""
        log = self.log.array() if self.log is not None else np.zeros((0, 2), dtype=np.int64)
        return replay(self.read_ids() if base is None else base, np.asarray(log), self.faiss_rows, rows)

    def index_path(self) -> str:
        return str(self.path("index"))

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
