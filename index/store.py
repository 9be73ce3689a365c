"""The SQLite passage store of one collection: the collection record, documents and passages.

Passage ids are SQLite AUTOINCREMENT integers, never reused, and double as the vector index ids.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvrag.errors import InvalidInputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, config TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, source TEXT, title TEXT, content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}', updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
    lang TEXT, kind TEXT NOT NULL CHECK (kind IN ('text', 'code')), title TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', content_hash TEXT NOT NULL, compressed TEXT);
CREATE TABLE IF NOT EXISTS compression (
    id INTEGER PRIMARY KEY CHECK (id = 1), method TEXT NOT NULL, rate REAL NOT NULL, source TEXT);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id);
CREATE INDEX IF NOT EXISTS documents_source ON documents(source);
"""
_COLUMNS = {
    "lang": "p.lang",
    "kind": "p.kind",
    "doc_id": "p.doc_id",
    "source": "d.source",
    "title": "d.title",
}
MAX_METADATA_DEPTH = 16  # what search hits and API answers can send back as JSON
MAX_FILTER_KEYS = 64
MAX_FILTER_VALUES = 1000  # SQLite binds each as a parameter
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass
class PassageRow:
    """A passage as stored, with its document's title and source for citations."""

    id: int
    doc_id: str
    ord: int
    text: str
    start: int
    end: int
    lang: str | None
    kind: str
    title: str | None
    doc_title: str | None
    source: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    compressed: str | None = None  # the compressed text the passage KV is computed from, if any


class PassageStore:
    """SQLite-backed documents and passages (WAL mode; one writer at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database created by an earlier version up to the current schema."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(passages)")}
        if "compressed" not in columns:
            self.db.execute("ALTER TABLE passages ADD COLUMN compressed TEXT")

    def close(self) -> None:
        self.db.close()

    # -- collection record ---------------------------------------------------------------------
    def set_collection(self, name: str, config: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO collections VALUES (?, ?, ?)",
            (name, json.dumps(config), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        )

    def collection_config(self) -> dict | None:
        row = self.db.execute("SELECT config FROM collections LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    # -- documents -----------------------------------------------------------------------------
    def document_hashes(self, source_prefix: str | None = None, *, exact: bool = False) -> dict[str, str]:
        """doc id -> content hash; optionally only documents whose source starts with (or, with
        `exact`, equals) the given string, compared case-sensitively."""
        if source_prefix is None:
            rows = self.db.execute("SELECT id, content_hash FROM documents")
        elif exact:
            rows = self.db.execute(
                "SELECT id, content_hash FROM documents WHERE source = ?", (source_prefix,)
            )
        else:
            rows = self.db.execute(
                "SELECT id, content_hash FROM documents WHERE substr(source, 1, ?) = ?",
                (len(source_prefix), source_prefix),
            )
        return dict(rows.fetchall())

    def document_hash(self, doc_id: str) -> str | None:
        """The stored content hash of one document; None when it is not stored."""
        row = self.db.execute("SELECT content_hash FROM documents WHERE id=?", (doc_id,)).fetchone()
        return row[0] if row else None

    def document_passage_ids(self, doc_ids: Sequence[str]) -> list[int]:
        """The passage ids of these documents, ascending (unknown documents have none)."""
        out: list[int] = []
        ids = list(doc_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = f"SELECT id FROM passages WHERE doc_id IN ({','.join('?' * len(chunk))})"
            out += [r[0] for r in self.db.execute(sql, chunk)]
        return sorted(out)

    def get_document(self, doc_id: str) -> dict | None:
        row = self.db.execute(
            "SELECT id, source, title, content_hash, metadata, updated_at FROM documents WHERE id=?",
            (doc_id,),
        ).fetchone()
        if row is None:
            return None
        keys = ("id", "source", "title", "content_hash", "metadata", "updated_at")
        doc = dict(zip(keys, row, strict=True))
        doc["metadata"] = json.loads(doc["metadata"])
        doc["passages"] = [
            r[0] for r in self.db.execute("SELECT id FROM passages WHERE doc_id=? ORDER BY ord", (doc_id,))
        ]
        return doc

    def replace_document(self, doc: dict, passages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """Insert or replace a document and its passages in one transaction.

        Returns (removed passage ids, new passage ids) so the caller can update the vector index.
        """
        check_metadata(doc["id"], doc.get("metadata") or {})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.transaction():
            removed = [r[0] for r in self.db.execute("SELECT id FROM passages WHERE doc_id=?", (doc["id"],))]
            self.db.execute("DELETE FROM passages WHERE doc_id=?", (doc["id"],))
            self.db.execute(
                "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                (
                    doc["id"],
                    doc.get("source"),
                    doc.get("title"),
                    doc["content_hash"],
                    json.dumps(doc.get("metadata") or {}, ensure_ascii=False),
                    now,
                ),
            )
            added = []
            for i, p in enumerate(passages):
                cur = self.db.execute(
                    "INSERT INTO passages (doc_id, ord, text, start, end, lang, kind, title, metadata, content_hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        doc["id"],
                        i,
                        p["text"],
                        p["start"],
                        p["end"],
                        p.get("lang"),
                        p["kind"],
                        p.get("title"),
                        json.dumps(p.get("metadata") or {}, ensure_ascii=False),
                        p["content_hash"],
                    ),
                )
                added.append(int(cur.lastrowid))
        return removed, added

    def delete_documents(self, doc_ids: Iterable[str]) -> list[int]:
        """Delete documents with their passages; returns the removed passage ids."""
        removed: list[int] = []
        with self.transaction():
            for doc_id in doc_ids:
                removed += [
                    r[0] for r in self.db.execute("SELECT id FROM passages WHERE doc_id=?", (doc_id,))
                ]
                self.db.execute("DELETE FROM documents WHERE id=?", (doc_id,))
        return removed

    def transaction(self):
        return _Transaction(self.db)

    # -- passages ------------------------------------------------------------------------------
    def passage_ids(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM passages ORDER BY id")]

    def passage_id_array(self) -> np.ndarray:
        """The passage ids, ascending, as int64: read as one string and parsed by NumPy, several
        times faster than row by row (it serves the consistency check on opening a collection)."""
        joined = self.db.execute("SELECT group_concat(id) FROM passages").fetchone()[0]
        return np.sort(np.fromstring(joined or "", dtype=np.int64, sep=","))

    def texts_after(self, last_id: int) -> tuple[list[int], list[str]]:
        """(ids, texts) of the passages whose id is above `last_id`, in id order: those added since a
        moment when `last_id` was taken (ids only grow), found through the primary key alone."""
        rows = self.db.execute("SELECT id, text FROM passages WHERE id > ? ORDER BY id", (int(last_id),))
        found = rows.fetchall()
        return [r[0] for r in found], [r[1] for r in found]

    def texts(self, ids: Sequence[int]) -> tuple[list[int], list[str]]:
        """(ids, texts) of the given passages that are stored, in id order."""
        found: list[tuple[int, str]] = []
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found += self.db.execute(
                f"SELECT id, text FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
        found.sort()
        return [r[0] for r in found], [r[1] for r in found]

    def missing_ids(self, ids: Sequence[int]) -> list[int]:
        """Those of `ids` that no stored passage has (deleted, or never stored)."""
        ids = [int(i) for i in ids]
        present: set[int] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.db.execute(
                f"SELECT id FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            present.update(r[0] for r in rows)
        return [i for i in ids if i not in present]

    def passages(self, ids: Sequence[int]) -> list[PassageRow]:
        """Rows for the given ids, in the same order (unknown ids are skipped)."""
        found: dict[int, PassageRow] = {}
        ids = list(ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.db.execute(
                "SELECT p.id, p.doc_id, p.ord, p.text, p.start, p.end, p.lang, p.kind, p.title, d.title, d.source,"
                " p.metadata, p.compressed FROM passages p JOIN documents d ON d.id = p.doc_id"
                f" WHERE p.id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for r in rows:
                found[r[0]] = PassageRow(*r[:11], metadata=json.loads(r[11]), compressed=r[12])
        return [found[i] for i in ids if i in found]

    def iter_texts(self, batch: int = 10_000):
        """(ids, texts) batches of all passages in id order."""
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT id, text FROM passages WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], [r[1] for r in rows]
            last = rows[-1][0]

    # -- compressed texts ----------------------------------------------------------------------
    def compression(self) -> dict | None:
        """The method, rate and source (compressor model) the stored compressed texts were made with."""
        row = self.db.execute("SELECT method, rate, source FROM compression WHERE id = 1").fetchone()
        return {"method": row[0], "rate": row[1], "source": row[2]} if row else None

    def set_compression(self, method: str, rate: float, source: str | None = None) -> None:
        """Record the compression settings; when they differ from the recorded ones, every stored
        compressed text is dropped (it was made with other settings)."""
        record = {"method": method, "rate": float(rate), "source": source}
        with self.transaction():
            if self.compression() != record:
                self.db.execute("UPDATE passages SET compressed = NULL")
                self.db.execute(
                    "INSERT OR REPLACE INTO compression VALUES (1, ?, ?, ?)", (method, float(rate), source)
                )

    def clear_compression(self) -> None:
        """Drop the compressed texts and the compression record."""
        with self.transaction():
            self.db.execute("UPDATE passages SET compressed = NULL")
            self.db.execute("DELETE FROM compression")

    def set_compressed(self, texts: dict[int, str | None]) -> None:
        """Store compressed texts by passage id (None clears one)."""
        with self.transaction():
            self.db.executemany(
                "UPDATE passages SET compressed = ? WHERE id = ?", [(t, int(i)) for i, t in texts.items()]
            )

    def compressed_texts(self, ids: Sequence[int]) -> dict[int, str | None]:
        """passage id -> compressed text (None where there is none); unknown ids are skipped."""
        out: dict[int, str | None] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = self.db.execute(
                f"SELECT id, compressed FROM passages WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            out.update((r[0], r[1]) for r in rows)
        return out

    def uncompressed(self) -> tuple[list[int], list[str]]:
        """(ids, original texts) of the passages without a compressed text, in id order."""
        rows = self.db.execute(
            "SELECT id, text FROM passages WHERE compressed IS NULL ORDER BY id"
        ).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def compress_passages(
        self,
        compress: Callable[[list[str]], list[str]],
        method: str,
        rate: float,
        source: str | None = None,
        *,
        batch: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Compress every passage lacking a compressed text (all of them when the method, rate or
        source changed) with `compress(texts) -> texts`, in batches; the original texts stay as they are."""
        self.set_compression(method, rate, source)
        ids, texts = self.uncompressed()
        self.compress_ids(ids, texts, compress, batch=batch, progress=progress)
        total = self.counts()["passages"]
        return {"method": method, "rate": float(rate), "compressed": len(ids), "reused": total - len(ids)}

    def compress_ids(
        self,
        ids: Sequence[int],
        texts: Sequence[str],
        compress: Callable[[list[str]], list[str]],
        *,
        batch: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Store `compress(texts)` as the compressed texts of passages `ids`, in batches."""
        for start in range(0, len(ids), batch):
            chunk = list(texts[start : start + batch])
            out = compress(chunk)
            if len(out) != len(chunk):
                raise RuntimeError(f"the compressor returned {len(out)} texts for {len(chunk)}")
            self.set_compressed(dict(zip(ids[start : start + batch], out, strict=True)))
            if progress is not None:
                progress(len(chunk))

    def filter_ids(self, flt: dict[str, Any]) -> list[int]:
        """Passage ids matching every key of a metadata filter.

        Keys `lang`, `kind`, `doc_id`, `source`, `title` match columns; any other key matches the passage's
        metadata JSON, else the document's. A value may be a scalar (equality) or a list (any of).
        """
        if not isinstance(flt, dict) or not flt:
            raise InvalidInputError('a filter is a non-empty JSON object, e.g. {"lang": "de"}')
        if len(flt) > MAX_FILTER_KEYS:
            raise InvalidInputError(f"a filter has at most {MAX_FILTER_KEYS} keys, not {len(flt)}")
        where, params = [], []
        total = 0
        for key, value in flt.items():
            if not _KEY_RE.fullmatch(str(key)):
                raise InvalidInputError(f"filter key {key!r} is not a valid field name")
            values = value if isinstance(value, list) else [value]
            if not values or any(not isinstance(v, str | int | float | bool) for v in values):
                raise InvalidInputError(
                    f"filter value for {key!r} must be a string, number, boolean or a list of them"
                )
            if any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in values):
                raise InvalidInputError(
                    f"filter value for {key!r} is out of range: integers are 64-bit (-2**63 to 2**63-1)"
                )
            total += len(values)
            if total > MAX_FILTER_VALUES:
                raise InvalidInputError(f"a filter lists at most {MAX_FILTER_VALUES} values in all")
            if key in _COLUMNS:
                expr = _COLUMNS[key]
            else:
                expr = "COALESCE(json_extract(p.metadata, ?), json_extract(d.metadata, ?))"
                params += [f'$."{key}"'] * 2
            where.append(f"{expr} IN ({','.join('?' * len(values))})")
            params += values
        sql = f"SELECT p.id FROM passages p JOIN documents d ON d.id = p.doc_id WHERE {' AND '.join(where)}"
        return [r[0] for r in self.db.execute(sql, params)]

    def max_passage_id(self) -> int | None:
        """The newest passage id (ids only grow); None for an empty store."""
        return self.db.execute("SELECT MAX(id) FROM passages").fetchone()[0]

    def counts(self) -> dict[str, int]:
        docs = self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        passages = self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
        return {"documents": int(docs), "passages": int(passages)}


def check_metadata(doc_id: str, metadata: Any) -> None:
    """Refuse metadata nested deeper than `MAX_METADATA_DEPTH` (it could not be sent back)."""
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidInputError(
            f"document {doc_id!r}: metadata nests more than {MAX_METADATA_DEPTH} levels deep"
        )


def _depth(value: Any, limit: int = MAX_METADATA_DEPTH + 1) -> int:
    """Nesting depth of a JSON value (a scalar is 0), counted no further than `limit`."""
    if limit <= 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
