"""The ingest plan: how documents become searchable passages with KV caches, defined once.

Steps, in order, each a method of `IngestPlan(collection)`:

  triage    a document's checks: id unique within the run, size limit, an emptied document's old
            passages removed, unchanged content skipped -> the content hash to store, or None
  rows      the document cut into passage rows (`passage_rows`: text, offsets, kind, section
            title, language, hash)
  store     the rows replace the document's old passages in SQLite, which assigns the ids
  embed     what the encoder sees of a passage (`embed_text`) -> vectors added to the index in
            groups; the first group calibrates a new quantised index (`add_vectors`)
  compress  the passages of a compressed collection that lack a compressed text get one
            (`compression_todo` -> compressor -> `set_compressed`); embeddings, BM25 and citations
            stay on the original texts
  kv        a KV cache for `kv_text` of each passage: the ONE policy of which text gets a cache
            (the compressed text where the passage has one, else the original), used at indexing
            time by every executor and at query time by the pipeline, so the keys always meet; a
            collection whose `kv_policy` is `lazy` skips this step (caches are computed on first
            retrieval and written back)
  commit    repair, then the vector index and BM25 saved together

Executors decide where each step runs, never what it does: `index.job.run_local` runs them all in
this process (the CLI's local engine and the HTTP upsert); `index.ray_job.index_paths_ray` runs
`rows`, `embed`, `compress` and `kv` in Ray actor pools and the rest on the driver, the one writer.

The KV and compression steps are given as small protocols (`KVPrecompute`, `PassageCompressor`)
so that this layer needs no generator: `kvrag.rag` provides them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kvrag.encoders.adaptor import encode_pseudo_queries, pseudo_queries_suit
from kvrag.errors import InvalidInputError
from kvrag.index.chunking import chunk_document
from kvrag.index.lang import guess_language
from kvrag.index.vector import calibrates_on_queries

if TYPE_CHECKING:
    from kvrag.encoders.encoder import Encoder
    from kvrag.index.collection import Collection, CollectionConfig
    from kvrag.index.store import PassageRow

MAX_DOC_CHARS = 2_000_000
GROUP_PASSAGES = 256  # passages per vector group: the first group calibrates a quantised index


@dataclass
class Document:
    """A document to index: its own id, text, and what citations and filters need."""

    id: str
    text: str
    title: str | None = None
    source: str | None = None
    kind: str = "text"  # text | python | code
    lang: str | None = None
    metadata: dict = field(default_factory=dict)

    def content_hash(self, chunking: str) -> str:
        payload = json.dumps(
            [self.text, self.title, self.kind, self.lang, self.metadata, chunking],
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class JobReport:
    """What a run did; printed as JSON by `kvrag index --json`."""

    collection: str
    documents_seen: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    pruned: int = 0
    passages_added: int = 0
    passages_removed: int = 0
    repaired: int = 0
    skipped_files: list[str] = field(default_factory=list)
    documents: int = 0
    passages: int = 0
    seconds: float = 0.0
    compression: dict | None = None  # the compress step's figures, when it ran
    kv: dict | None = None  # the KV step's figures, when it ran


@dataclass(frozen=True)
class Compression:
    """How a collection's passages are compressed before their KV is computed (recorded with them)."""

    method: str
    rate: float
    source: str | None = None  # the compressor model the texts were made with


class PassageCompressor(Protocol):
    """Shrinks passage texts (`kvrag.rag.compress`)."""

    def compress(self, texts: list[str], *, rate: float) -> list[str]: ...


class KVPrecompute(Protocol):
    """Computes and stores the KV caches of (text, document title) passages not yet in the store
    (`kvrag.rag.kvcache.manager.KVCacheManager.ensure_texts`)."""

    def ensure_texts(
        self, items: Sequence[tuple[str, str | None]], *, progress: bool = False
    ) -> dict[str, Any]: ...


# -- the policies, as free functions (Ray actors call them without a collection) ---------------------


def embed_text(title: str | None, text: str, kind: str) -> str:
    """What the encoder sees for a passage: prose gets its document title in front (as BEIR/MTEB do)."""
    return f"{title} {text}" if title and kind == "text" else text


def kv_text(text: str, compressed: str | None) -> str:
    """The text a passage's KV cache is computed from: its compressed text when it has one, else its
    original text. Indexing (every executor) and querying both go through this."""
    return compressed or text


def kv_item(row: PassageRow, *, use_compressed: bool = True) -> tuple[str, str | None]:
    """(text, document title): what `KVPrecompute` and the query side key a passage's cache by."""
    return kv_text(row.text, row.compressed if use_compressed else None), row.doc_title


def input_dim(config: CollectionConfig, encoder_dim: int) -> int | None:
    """What the vector index takes: with a Matryoshka adaptor the encoder's full embeddings (the index
    adapts and truncates them itself), else None (vectors come truncated to the collection's dim)."""
    return encoder_dim if config.adaptor != "none" else None


def passage_rows(
    text: str,
    kind: str,
    lang: str | None,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    overlap_tokens: int,
) -> list[dict]:
    """A document's passages as stored (text, offsets, kind, section title, language, hash)."""
    chunks = chunk_document(
        text, kind=kind, count_tokens=count_tokens, max_tokens=max_tokens, overlap_tokens=overlap_tokens
    )
    doc_lang = lang or (guess_language(text) if kind == "text" else None)
    return [
        {
            "text": c.text,
            "start": c.start,
            "end": c.end,
            "kind": c.kind,
            "title": c.title,
            "lang": doc_lang if kind != "text" else (lang or guess_language(c.text) or doc_lang),
            "content_hash": hashlib.sha256(c.text.encode()).hexdigest(),
        }
        for c in chunks
    ]


class IngestPlan:
    """The steps of one ingest run into one collection (see the module docstring); the executor
    holds the collection's writer lock while it runs them."""

    def __init__(
        self,
        collection: Collection,
        *,
        compression: Compression | None = None,
        report: JobReport | None = None,
    ):
        """`compression`: compress passages with these settings (a changed setting recompresses
        every passage); None keeps what the collection recorded, if anything."""
        self.collection = collection
        self.config = collection.config
        self.store = collection.store
        self.report = report or JobReport(collection.name)
        self.chunking = f"{self.config.max_tokens}/{self.config.overlap_tokens}"
        self.seen: set[str] = set()
        self._known: dict[str, str | None] = {}  # document id -> stored hash, as triage found it
        self.new_ids: list[int] = []
        record = self.store.compression()
        self.compression = compression or (Compression(**record) if record else None)
        self._compression_changed = compression is not None and (
            record is None or Compression(**record) != compression
        )

    # -- triage, rows, store ---------------------------------------------------------------------
    def triage(self, doc: Document) -> str | None:
        """The checks before chunking (module docstring); the content hash to store when the
        document must be (re)chunked, else None."""
        report = self.report
        report.documents_seen += 1
        if doc.id in self.seen:
            raise InvalidInputError(f"document id {doc.id!r} appears twice in this run: ids must be unique")
        self.seen.add(doc.id)
        known = self._known[doc.id] = self.store.document_hash(doc.id)
        if not doc.text.strip():
            if known is not None:  # emptied since the last run: its old passages must go
                self.remove_documents([doc.id])
                report.pruned += 1
            report.skipped_files.append(f"{doc.id} (empty)")
            return None
        if len(doc.text) > MAX_DOC_CHARS:
            raise InvalidInputError(
                f"document {doc.id!r} has {len(doc.text)} characters; split it below {MAX_DOC_CHARS}"
            )
        digest = doc.content_hash(self.chunking)
        if known == digest:
            report.unchanged += 1
            return None
        return digest

    def rows(self, doc: Document, count_tokens: Callable[[str], int]) -> list[dict]:
        """The document's passage rows, cut with the encoder's tokenizer."""
        return passage_rows(
            doc.text, doc.kind, doc.lang, count_tokens, self.config.max_tokens, self.config.overlap_tokens
        )

    def store_document(self, doc: Document, digest: str, rows: list[dict]) -> list[int]:
        """Replace the document's passages with `rows`; returns the new passage ids (in order)."""
        replaced = self._known.get(doc.id) is not None
        removed, added = self.store.replace_document(
            {
                "id": doc.id,
                "source": doc.source,
                "title": doc.title,
                "content_hash": digest,
                "metadata": doc.metadata,
            },
            rows,
        )
        self.report.replaced += replaced
        self.report.added += not replaced
        index = self.collection.index
        self.report.passages_removed += index.remove(removed) if index is not None else 0
        self.collection.bm25_dirty = True
        self.new_ids += added
        return added

    def remove_documents(self, doc_ids: list[str]) -> None:
        """Delete documents and their vectors."""
        removed = self.store.delete_documents(doc_ids)
        index = self.collection.index
        self.report.passages_removed += index.remove(removed) if index is not None else 0
        self.collection.bm25_dirty = True

    def prune(self, sources: list[str]) -> None:
        """Delete the documents under `sources` (a folder ends with the path separator) that this
        run did not see: their files are gone."""
        gone = [
            d
            for src in sources
            for d in self.store.document_hashes(src, exact=not src.endswith(os.sep))
            if d not in self.seen
        ]
        if gone:
            self.remove_documents(gone)
            self.report.pruned = len(gone)

    # -- embed -----------------------------------------------------------------------------------
    def embed_texts(self, ids: Sequence[int]) -> list[str]:
        """What the encoder sees of each stored passage, in the order of `ids`."""
        rows = {r.id: r for r in self.store.passages(list(ids))}
        return [embed_text(rows[i].doc_title, rows[i].text, rows[i].kind) for i in ids]

    def input_dim(self, encoder_dim: int) -> int | None:
        return input_dim(self.config, encoder_dim)

    def add_vectors(self, ids: Sequence[int], vectors: np.ndarray, encoder: Callable[[], Encoder]) -> None:
        """Add one group of vectors. The group that meets a new quantised index calibrates it, with
        pseudo-queries made from its own passages by the encoder `encoder()` returns (called only
        then: executors whose encoders live elsewhere load one for that group alone)."""
        cfg = self.config
        full = vectors.shape[1]
        index = self.collection.ensure_index(cfg.dim or full, input_dim=self.input_dim(full))
        fit_queries = None
        if not index.fitted and calibrates_on_queries(cfg.adaptor, index.spec.precision):
            passages = calibration_passages(self.collection, list(ids))
            if passages is not None:
                fit_queries = encode_pseudo_queries(encoder(), passages, dim=index.input_dim)
        index.add(np.asarray(ids, dtype=np.int64), vectors, fit_queries=fit_queries)
        self.report.passages_added += len(ids)

    # -- compress, kv ----------------------------------------------------------------------------
    def compression_todo(self, *, everything: bool) -> tuple[list[int], list[str]]:
        """(ids, original texts) of the passages that need a compressed text: none without
        compression; all lacking one after a change of settings or with `everything` (a full job,
        which also fills in what an earlier run left undone); else those of this run's documents."""
        if self.compression is None:
            return [], []
        c = self.compression
        self.store.set_compression(c.method, c.rate, c.source)  # a change drops the old texts
        if everything or self._compression_changed:
            return self.store.uncompressed()
        ids = self.store.document_passage_ids(sorted(self.seen))
        missing = [i for i, t in self.store.compressed_texts(ids).items() if t is None]
        rows = {r.id: r.text for r in self.store.passages(missing)}
        return missing, [rows[i] for i in missing]

    def kv_ids(self, *, everything: bool) -> list[int]:
        """The passages whose KV caches the run makes sure of: every stored passage for a full job
        (present ones cost one existence check), else those of this run's documents."""
        return self.store.passage_ids() if everything else self.store.document_passage_ids(sorted(self.seen))

    def kv_items(self, ids: Sequence[int]) -> list[tuple[str, str | None]]:
        """`kv_item` of the stored passages `ids`, in order."""
        rows = {r.id: r for r in self.store.passages(list(ids))}
        return [kv_item(rows[i]) for i in ids if i in rows]

    # -- commit ----------------------------------------------------------------------------------
    def finish(self, repaired: int) -> JobReport:
        """Save the indexes and fill in the report's totals."""
        self.report.repaired = repaired
        self.collection.commit()
        self.report.documents, self.report.passages = self.store.counts().values()
        return self.report


def calibration_passages(collection: Collection, ids: list[int]) -> list[tuple[str, str | None]] | None:
    """The (text, title) of the stored passages of the one batch that calibrates a new index, whose
    pseudo-queries (`encoders.adaptor.encode_pseudo_queries`) are fitted with them; None when the batch
    is mostly source code, which calibrates on its passages alone (`encoders.adaptor.pseudo_queries_suit`)."""
    rows = {r.id: r for r in collection.store.passages(ids)}
    if not pseudo_queries_suit([r.text for r in rows.values()], [r.kind for r in rows.values()]):
        return None
    return [(rows[i].text, rows[i].title or rows[i].doc_title) if i in rows else ("", None) for i in ids]
