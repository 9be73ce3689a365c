"""A collection: one folder holding the passage store, the vector index, the BM25 index and config.

$KVRAG_HOME/collections/NAME/passages.sqlite
                             vectors/manifest.json, index.G.faiss, ids.G.npy, vectors.f32, ...
                             bm25/bm25.json, gen.G/
                             writer.lock

Each part is written crash-safely on its own (SQLite transactions, generation files behind a
manifest), but together they are only consistent after `commit()`: a writer killed in between
leaves the store ahead of the indexes, which `index.job.recover` puts right when the collection is
next opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvrag.atomic import fsync_dir
from kvrag.encoders.adaptor import check_method
from kvrag.encoders.encoder import Encoder
from kvrag.errors import (
    CollectionNotFoundError,
    CorruptIndexError,
    DimensionMismatchError,
    InvalidInputError,
)
from kvrag.index.hybrid import BM25Index, rrf
from kvrag.index.store import PassageRow, PassageStore
from kvrag.index.vector import VectorIndex, parse_spec

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_QUERY_CHARS = 4000
WRITER_LOCK = "writer.lock"


@dataclass(frozen=True)
class CollectionConfig:
    """Fixed at creation: changing the encoder, spec or chunking means a new collection."""

    encoder: str = "bundled:multilingual-e5-small"
    spec: str = "Flat"
    dim: int | None = None  # Matryoshka truncation; None keeps the encoder's full dimension
    rescore_with: str = "float32"
    binary_method: str = "itq"
    adaptor: str = "none"  # Matryoshka adaptor fitted on the corpus: none, pca or learned
    max_tokens: int = 256
    overlap_tokens: int = 32
    bm25_language: str | None = None
    # when passage KV caches are computed: "eager" at indexing time (each passage once, so the first
    # question over it is fast), "lazy" on first retrieval (written back; indexing costs no generator)
    kv_policy: str = "eager"


KV_POLICIES = ("eager", "lazy")


@dataclass
class Hit:
    """One search result with what a citation needs."""

    passage_id: int
    score: float
    doc_id: str
    title: str | None
    source: str | None
    text: str
    start: int
    end: int
    lang: str | None
    kind: str
    section: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    compressed: str | None = None  # the compressed text the passage KV was computed from, if any

    @classmethod
    def from_row(cls, row: PassageRow, score: float) -> Hit:
        return cls(
            row.id,
            float(score),
            row.doc_id,
            row.doc_title,
            row.source,
            row.text,
            row.start,
            row.end,
            row.lang,
            row.kind,
            row.title,
            row.metadata,
            row.compressed,
        )


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid collection name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


class Collection:
    """Passage store + vector index + BM25 of one collection, kept consistent by `commit()`.

    `device` (e.g. the `device` setting) is handed to the vector index only when it names a CUDA
    device, where a BFlat index then scans its codes with the Hamming top-k kernel; on CPU the index
    keeps its defaults.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        config: CollectionConfig,
        store: PassageStore,
        *,
        device: str | None = None,
    ):
        self.folder, self.name, self.config, self.store = folder, name, config, store
        self.device = device if device is not None and str(device).startswith("cuda") else None
        self._index: VectorIndex | None = None
        self._bm25: BM25Index | None = None
        self.bm25_dirty = False
        # commit applies the passages' changes to BM25 (False: rebuilds it, as earlier versions did)
        self.bm25_incremental = True
        self._writer = threading.RLock()
        self._writer_fd: int | None = None
        self._writer_depth = 0
        self.saved_stamp: int | None = None  # `stamp` after this object's last save

    # -- lifecycle ------------------------------------------------------------------------------
    @staticmethod
    def folder_for(home: Path, name: str) -> Path:
        return Path(home) / "collections" / validate_name(name)

    @classmethod
    def create(
        cls, home: Path, name: str, config: CollectionConfig, *, device: str | None = None
    ) -> Collection:
        folder = cls.folder_for(home, name)
        if (folder / "passages.sqlite").exists():
            raise InvalidInputError(
                f"collection {name!r} already exists: delete it first or pick another name"
            )
        parse_spec(config.spec)
        if config.rescore_with not in ("float32", "int8"):
            raise InvalidInputError("rescore_with must be float32 or int8")
        check_method(config.adaptor)
        if config.kv_policy not in KV_POLICIES:
            raise InvalidInputError(
                f"kv_policy must be one of {', '.join(KV_POLICIES)}, not {config.kv_policy!r}"
            )
        # built beside its final place and renamed there once complete: a process or thread that
        # opens the collection meanwhile finds either nothing or a whole store, never one still
        # being set up (two connections setting up one database answer "database is locked")
        staging = folder.with_name(f".creating-{name}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        try:
            store = PassageStore(staging / "passages.sqlite")
            store.set_collection(name, asdict(config))
            store.close()
            os.rename(staging, folder)  # an empty folder left by an earlier failed create is replaced
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if (folder / "passages.sqlite").exists():
                raise InvalidInputError(
                    f"collection {name!r} already exists: delete it first or pick another name"
                ) from None
            raise
        fsync_dir(folder.parent)
        return cls(folder, name, config, PassageStore(folder / "passages.sqlite"), device=device)

    @classmethod
    def stamp(cls, home: Path, name: str) -> int:
        """When the collection's vector index was last saved (its manifest's mtime in ns; 0 when
        there is none): an open collection whose stamp moved was written by another process."""
        try:
            return (cls.folder_for(home, name) / "vectors" / "manifest.json").stat().st_mtime_ns
        except OSError:
            return 0

    @classmethod
    def open(cls, home: Path, name: str, *, device: str | None = None) -> Collection:
        folder = cls.folder_for(home, name)
        if not (folder / "passages.sqlite").exists():
            raise CollectionNotFoundError(
                f"no collection {name!r} in {home}: create it with `kvrag index --collection {name} PATH`"
            )
        store = PassageStore(folder / "passages.sqlite")
        raw = store.collection_config() or {}
        known = CollectionConfig.__dataclass_fields__
        config = CollectionConfig(**{k: v for k, v in raw.items() if k in known})
        return cls(folder, name, config, store, device=device)

    @classmethod
    def open_or_create(
        cls, home: Path, name: str, config: CollectionConfig, *, device: str | None = None
    ) -> Collection:
        try:
            return cls.open(home, name, device=device)
        except CollectionNotFoundError:
            return cls.create(home, name, config, device=device)

    @staticmethod
    def list(home: Path) -> list[str]:
        root = Path(home) / "collections"
        return (
            sorted(
                p.name
                for p in root.iterdir()
                if NAME_RE.fullmatch(p.name) and (p / "passages.sqlite").exists()
            )
            if root.exists()
            else []
        )

    @classmethod
    def detach(cls, home: Path, name: str) -> Path:
        """Take a collection out of `home` at once (an atomic rename); returns the renamed folder,
        for `shutil.rmtree`. Its files may still be open in a process that writes to them."""
        folder = cls.folder_for(home, name)
        if not (folder / "passages.sqlite").exists():
            raise CollectionNotFoundError(f"no collection {name!r} in {home}")
        trash = folder.with_name(f".deleted-{name}-{uuid.uuid4().hex[:8]}")
        os.replace(folder, trash)
        return trash

    @classmethod
    def delete(cls, home: Path, name: str) -> None:
        shutil.rmtree(cls.detach(home, name), ignore_errors=True)

    def close(self) -> None:
        self.store.close()

    # -- parts ----------------------------------------------------------------------------------
    @property
    def index(self) -> VectorIndex | None:
        if self._index is None and (self.folder / "vectors" / "manifest.json").exists():
            self._index = VectorIndex.load(self.folder / "vectors", device=self.device)
        return self._index

    def ensure_index(self, dim: int, *, input_dim: int | None = None) -> VectorIndex:
        """The vector index, created on first use with the encoder's (truncated) dimension.

        With an adaptor the index takes the encoder's full embeddings (`input_dim`, then
        `index.input_dim`: encode passages and queries at that dimension) and truncates them itself.
        """
        if self.index is None:
            if self.config.adaptor != "none" and input_dim is None:
                if self.config.dim is not None:
                    raise InvalidInputError(
                        f"collection {self.name!r} uses the {self.config.adaptor} adaptor, which needs the "
                        "encoder's full embeddings: pass input_dim=encoder.dim and encode at index.input_dim"
                    )
                input_dim = dim
            self._index = VectorIndex(
                self.config.spec,
                dim,
                encoder=self.config.encoder,
                rescore_with=self.config.rescore_with,
                binary_method=self.config.binary_method,
                device=self.device,
                adaptor=self.config.adaptor,
                input_dim=input_dim if self.config.adaptor != "none" else None,
            )
        if self._index.dim != dim:
            raise DimensionMismatchError(
                f"collection {self.name!r} holds {self._index.dim}-dim vectors, got {dim}"
            )
        return self._index

    @property
    def bm25(self) -> BM25Index:
        """The BM25 index: the saved one when it holds exactly the store's passages, else rebuilt
        from the store (missing, unreadable, or stale after a writer was killed between saving the
        vectors and BM25). A rebuild is saved only when no other writer holds the collection."""
        if self._bm25 is None:
            loaded = None
            if (self.folder / "bm25" / "bm25.json").exists() and not self.bm25_dirty:
                try:
                    loaded = BM25Index.load(self.folder / "bm25")
                except CorruptIndexError:
                    loaded = None
            if loaded is not None and np.array_equal(np.sort(loaded.ids), self.stored_ids()):
                self._bm25 = loaded
            else:
                with self.writing(blocking=False) as owner:
                    self.rebuild_bm25(save=owner)
        return self._bm25  # type: ignore[return-value]

    def rebuild_bm25(self, *, save: bool = True) -> None:
        """Build BM25 over all stored passages, O(N): when the saved index is missing, unreadable or
        of an earlier layout (`commit` otherwise updates it in place); `save` writes it (a new
        generation) to bm25/."""
        ids: list[int] = []
        texts: list[str] = []
        for batch_ids, batch_texts in self.store.iter_texts():
            ids += batch_ids
            texts += batch_texts
        self._bm25 = BM25Index(self.config.bm25_language)
        self._bm25.build(ids, texts)
        if save:
            with self.writing():
                self._bm25.save(self.folder / "bm25")
            self.bm25_dirty = False

    def commit(self) -> None:
        """Persist the vector index, then bring BM25 in line with the store after changes
        (`bm25_dirty`), holding the writer lock. Both cost what changed, not the collection's size:
        the vector save appends to its id log, BM25 takes the passages added and deleted since it
        was last in step (`update_bm25`).

        Each step is crash-safe on its own, so a kill leaves one of these states, all of which
        `index.job.recover` detects by comparing ids and repairs: SQLite ahead of both indexes (a
        kill before or during the vector save: the manifest still names the previous generation),
        or the vectors current and BM25 a generation behind (a kill before or during the BM25 save:
        bm25.json still names the previous generation). Vectors go first as they cost the most to
        recompute."""
        with self.writing():
            removed = np.zeros(0, dtype=np.int64)
            if self._index is not None:
                removed = self._index.unsaved_removals()  # before the save forgets them
                self._index.save(self.folder / "vectors")
                self.saved_stamp = self.stamp(self.folder.parent.parent, self.name)
            if self.bm25_dirty:
                self.update_bm25(removed)

    def update_bm25(self, removed_hint: np.ndarray | None = None) -> None:
        """Apply the passages added to and deleted from the store since BM25 was last in step with it
        (the one in memory, else the saved one), and save it; a full `rebuild_bm25` when there is no
        usable saved index or `bm25_incremental` is off.

        The delta costs what changed. Passage ids are never reused and only grow (SQLite
        AUTOINCREMENT), and BM25 was in step with the store at some earlier moment (a build reads
        every stored passage, an update ends in step), so every passage stored now whose id is at
        most the largest id BM25 has held is in BM25: the added passages are those past that id. The
        deleted ones are looked for among `removed_hint` (the ids the vector index lost since its
        last save) and the counts confirm them: with the additions and deletions applied, BM25 holds
        exactly the stored passages if and only if its count equals the store's. When it does not
        (a delete the vector index did not see, a saved BM25 older than the last vector save) the
        delta comes from comparing the id lists, O(N) in NumPy but with no re-tokenising."""
        with self.writing():
            bm = self._bm25 if self._bm25 is not None else self._saved_bm25()
            if bm is None or not bm.incremental or not self.bm25_incremental:
                self.rebuild_bm25()
                return
            hint = np.unique(np.asarray([] if removed_hint is None else removed_hint, dtype=np.int64))
            added, texts = self.store.texts_after(bm.max_id)
            gone = bm.live_among(np.asarray(self.store.missing_ids(hint.tolist()), dtype=np.int64))
            if bm.count - len(gone) + len(added) != self.store.counts()["passages"]:
                held, stored = np.sort(bm.ids), self.stored_ids()
                gone = np.setdiff1d(held, stored, assume_unique=True)
                added, texts = self.store.texts(np.setdiff1d(stored, held, assume_unique=True).tolist())
            try:
                bm.update(added, texts, gone)
            except InvalidInputError:  # it does not match the store after all: start over
                self.rebuild_bm25()
                return
            except BaseException:
                self._bm25 = None  # possibly half-updated: reloaded from disk when next needed
                raise
            self._bm25 = bm
            bm.save(self.folder / "bm25")
            self.bm25_dirty = False

    def _saved_bm25(self) -> BM25Index | None:
        """The saved BM25 index, None when there is none or it is unreadable."""
        if not (self.folder / "bm25" / "bm25.json").exists():
            return None
        try:
            return BM25Index.load(self.folder / "bm25")
        except CorruptIndexError:
            return None

    @contextlib.contextmanager
    def writing(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the collection's writer lock while changing its files, so that one writer at a time
        (process or Collection object) touches them. An flock on writer.lock: the kernel releases it
        when its holder dies, even by kill -9. Re-entrant within a thread of this object. Yields
        whether the lock is held: False only with `blocking=False` when another writer holds it (or
        the folder is read-only)."""
        if not self._writer.acquire(blocking=blocking):
            yield False
            return
        try:
            if self._writer_depth == 0:
                self._writer_fd = self._flock(blocking)
                if self._writer_fd is None:
                    yield False
                    return
            self._writer_depth += 1
            try:
                yield True
            finally:
                self._writer_depth -= 1
                if self._writer_depth == 0 and self._writer_fd is not None:
                    os.close(self._writer_fd)  # releases the flock
                    self._writer_fd = None
        finally:
            self._writer.release()

    def _flock(self, blocking: bool) -> int | None:
        """An fd of writer.lock holding its exclusive flock; None when `blocking` is False and it is
        held elsewhere or cannot be created."""
        try:
            fd = os.open(self.folder / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if blocking:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- consistency ----------------------------------------------------------------------------
    def stored_ids(self) -> np.ndarray:
        """The ids of the stored passages, ascending."""
        return self.store.passage_id_array()

    def vector_ids(self) -> np.ndarray:
        """The ids live in the vector index, ascending: from memory when it is loaded, else from its
        saved id map alone (no FAISS load); empty when there is no index yet."""
        if self._index is not None:
            ids = self._index.row_ids[self._index.row_ids >= 0]
        elif (self.folder / "vectors" / "manifest.json").exists():
            ids = VectorIndex.saved_ids(self.folder / "vectors")
        else:
            ids = np.zeros(0, dtype=np.int64)
        return np.sort(ids)

    def bm25_ids(self) -> np.ndarray | None:
        """The ids the BM25 index covers, ascending: from memory when it is loaded, else from its
        saved id map alone; None when there is no readable saved index."""
        ids = self._bm25.ids if self._bm25 is not None else BM25Index.saved_ids(self.folder / "bm25")
        return None if ids is None else np.sort(ids)

    # -- search ---------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        encoder: Encoder,
        *,
        k: int = 10,
        filter: dict | None = None,
        hybrid: bool = False,
        rescore: int = 1,
    ) -> list[Hit]:
        """Dense (optionally hybrid BM25 + dense by RRF) search with an optional metadata filter."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the query is empty: give some text to search for")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidInputError(f"the query has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
        if not 1 <= k <= 1000:
            raise InvalidInputError("k must be between 1 and 1000")
        if encoder.name != self.config.encoder:
            raise InvalidInputError(
                f"collection {self.name!r} was built with {self.config.encoder}, not {encoder.name}"
            )
        # the filter is checked even on an empty collection: a bad one is an error either way
        allowed = np.asarray(self.store.filter_ids(filter), dtype=np.int64) if filter else None
        index = self.index
        if index is None or index.ntotal == 0:
            return []
        if allowed is not None and len(allowed) == 0:
            return []
        t0 = time.perf_counter()
        q = encoder.encode([query], kind="query", dim=index.input_dim)
        depth = max(k, 100) if hybrid else k
        scores, ids = index.search(q, depth, rescore=rescore, allowed_ids=allowed)
        dense = [int(i) for i in ids[0] if i >= 0]
        score_of = dict(zip(dense, scores[0].tolist(), strict=False))
        if hybrid:
            _, lex = self.bm25.search([query], depth)
            lexical = [int(i) for i in lex[0] if i >= 0]
            if allowed is not None:
                allowed_set = set(allowed.tolist())
                lexical = [i for i in lexical if i in allowed_set]
            fused = rrf([dense, lexical], k)
            ranked, score_of = [pid for pid, _ in fused], dict(fused)
        else:
            ranked = dense[:k]
        self.last_search_ms = (time.perf_counter() - t0) * 1000
        rows = self.store.passages(ranked)
        return [Hit.from_row(r, score_of[r.id]) for r in rows]
