"""The batch indexing job: read files and JSONL, chunk, store passages, embed, index.

Idempotent: a document whose content hash is unchanged is skipped, a changed one is replaced, and
`prune=True` deletes documents whose source file is gone. Resumable: passages committed to SQLite
but missing from the vector index (a crash between the two) are embedded on the next run, and
vectors whose passage is gone are removed. `recover`, run when a collection is opened, does the
same without waiting for a next run, so that a killed job leaves no stored document unsearchable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvrag.encoders.adaptor import encode_pseudo_queries, pseudo_queries_suit
from kvrag.encoders.encoder import Encoder
from kvrag.errors import CorruptIndexError, InvalidInputError
from kvrag.index.chunking import chunk_document
from kvrag.index.collection import Collection
from kvrag.index.lang import guess_language
from kvrag.index.vector import calibrates_on_queries

TEXT_SUFFIXES = {".md": "text", ".markdown": "text", ".txt": "text", ".rst": "text"}
CODE_SUFFIXES = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".ts": "typescript",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".rb": "ruby",
    ".sh": "shell",
    ".sql": "sql",
    ".kt": "kotlin",
    ".swift": "swift",
    ".cs": "csharp",
    ".php": "php",
    ".scala": "scala",
    ".lua": "lua",
    ".r": "r",
}
MAX_FILE_BYTES = 10_000_000
MAX_DOC_CHARS = 2_000_000
CALIBRATION_PASSAGES = 256  # passages a repair calibrates a new index on (the job's first batch)


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


def read_jsonl(path: Path) -> Iterator[Document]:
    """JSONL records with `_id` or `id`, `text`, optional `title`, `lang`, `metadata`; other fields join metadata."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise InvalidInputError(f"{path}:{n}: expected a JSON object")
            doc_id = rec.pop("_id", None)
            if doc_id is None:
                doc_id = rec.pop("id", None)
            text = rec.pop("text", None)
            if doc_id is None or str(doc_id) == "" or not isinstance(text, str):
                raise InvalidInputError(
                    f"{path}:{n}: each record needs an id (`_id` or `id`) and a string `text`"
                )
            meta = rec.pop("metadata", None) or {}
            if not isinstance(meta, dict):
                raise InvalidInputError(f"{path}:{n}: `metadata` must be an object")
            title = rec.pop("title", None) or None
            lang = rec.pop("lang", None) or rec.pop("language", None)
            meta.update(rec)
            yield Document(
                str(doc_id), text, title=title, source=str(path), kind="text", lang=lang, metadata=meta
            )


def _files_under(root: Path) -> list[Path]:
    """The file itself, or the files under a folder in path order (hidden entries skipped)."""
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def count_file_kinds(paths: list[str | Path]) -> dict[str, int]:
    """How many source-code, text and JSONL files the paths hold (what `iter_documents` would read)."""
    counts = {"code": 0, "text": 0, "jsonl": 0}
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            continue
        files = _files_under(root)
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                counts["jsonl"] += 1
            elif suffix in TEXT_SUFFIXES:
                counts["text"] += 1
            elif suffix in CODE_SUFFIXES:
                counts["code"] += 1
    return counts


def iter_documents(paths: list[str | Path], skipped: list[str]) -> Iterator[Document]:
    """Documents from files and folders (recursively; hidden entries skipped)."""
    for raw in paths:
        root = Path(raw).expanduser().resolve()
        if not root.exists():
            raise InvalidInputError(f"{raw}: no such file or folder")
        for path in _files_under(root):
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from read_jsonl(path)
                continue
            kind = TEXT_SUFFIXES.get(suffix) or (
                "python" if suffix == ".py" else "code" if suffix in CODE_SUFFIXES else None
            )
            if kind is None:
                skipped.append(f"{path} (unsupported type)")
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped.append(f"{path} (larger than {MAX_FILE_BYTES} bytes)")
                continue
            try:
                # newline="" keeps CRLF as is, so offsets match the file; utf-8-sig drops a BOM
                with path.open(encoding="utf-8-sig", newline="") as fh:
                    text = fh.read()
            except UnicodeDecodeError:
                skipped.append(f"{path} (not UTF-8)")
                continue
            title = path.stem if kind != "text" else _markdown_title(text) or path.stem
            lang = CODE_SUFFIXES.get(suffix) if kind != "text" else None
            yield Document(str(path), text, title=title, source=str(path), kind=kind, lang=lang)


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        if line.startswith("# "):
            return line[2:].strip()
    return None


def embed_text(title: str | None, text: str, kind: str) -> str:
    """What the encoder sees for a passage: prose gets its document title in front (as BEIR/MTEB do)."""
    return f"{title} {text}" if title and kind == "text" else text


def triage(
    doc: Document,
    collection: Collection,
    known: dict[str, str],
    seen: set[str],
    chunking: str,
    report: JobReport,
) -> str | None:
    """The checks every engine makes on a document before chunking it: ids unique within the run, an
    emptied document's old passages removed, the size limit, unchanged content skipped. Returns the
    content hash when the document must be (re)chunked, else None."""
    report.documents_seen += 1
    if doc.id in seen:
        raise InvalidInputError(f"document id {doc.id!r} appears twice in this run: ids must be unique")
    seen.add(doc.id)
    if not doc.text.strip():
        if doc.id in known:  # emptied since the last run: its old passages must go
            removed = collection.store.delete_documents([doc.id])
            index = collection.index
            report.passages_removed += index.remove(removed) if index is not None else 0
            report.pruned += 1
            collection.bm25_dirty = True
        report.skipped_files.append(f"{doc.id} (empty)")
        return None
    if len(doc.text) > MAX_DOC_CHARS:
        raise InvalidInputError(
            f"document {doc.id!r} has {len(doc.text)} characters; split it below {MAX_DOC_CHARS}"
        )
    digest = doc.content_hash(chunking)
    if known.get(doc.id) == digest:
        report.unchanged += 1
        return None
    return digest


def index_documents(
    collection: Collection,
    docs: Iterator[Document],
    encoder: Encoder,
    *,
    prune_sources: list[str] | None = None,
    batch_docs: int = 256,
    show_progress: bool = False,
    report: JobReport | None = None,
) -> JobReport:
    """Bring the collection in line with `docs` (see module docstring), holding its writer lock."""
    with collection.writing():
        return _index_documents(
            collection,
            docs,
            encoder,
            prune_sources=prune_sources,
            batch_docs=batch_docs,
            show_progress=show_progress,
            report=report,
        )


def _index_documents(
    collection: Collection,
    docs: Iterator[Document],
    encoder: Encoder,
    *,
    prune_sources: list[str] | None,
    batch_docs: int,
    show_progress: bool,
    report: JobReport | None,
) -> JobReport:
    import time

    from tqdm.auto import tqdm

    cfg = collection.config
    report = report or JobReport(collection.name)
    t0 = time.perf_counter()
    chunking = f"{cfg.max_tokens}/{cfg.overlap_tokens}"
    known = collection.store.document_hashes()
    index = collection.ensure_index(cfg.dim or encoder.dim, input_dim=_input_dim(collection, encoder))
    seen: set[str] = set()
    pending: list[tuple[int, str]] = []  # (passage id, embed text)
    bar = tqdm(desc=f"index {collection.name}", unit="doc", disable=not show_progress)

    def flush() -> None:
        if not pending:
            return
        ids = [pid for pid, _ in pending]
        vecs = encoder.encode(
            [t for _, t in pending], kind="passage", dim=index.input_dim, show_progress=False
        )
        fit_queries = None
        if not index.fitted and calibrates_on_queries(cfg.adaptor, index.spec.precision):
            # the first batch calibrates the index: with pseudo-queries made from its own passages
            passages = calibration_passages(collection, ids)
            if passages is not None:
                fit_queries = encode_pseudo_queries(encoder, passages, dim=index.input_dim)
        index.add(np.array(ids, dtype=np.int64), vecs, fit_queries=fit_queries)
        report.passages_added += len(pending)
        pending.clear()

    for doc in docs:
        bar.update(1)
        digest = triage(doc, collection, known, seen, chunking, report)
        if digest is None:
            continue
        chunks = chunk_document(
            doc.text,
            kind=doc.kind,
            count_tokens=encoder.count_tokens,  # type: ignore[arg-type]
            max_tokens=cfg.max_tokens,
            overlap_tokens=cfg.overlap_tokens,
        )
        doc_lang = doc.lang or (guess_language(doc.text) if doc.kind == "text" else None)
        rows = [
            {
                "text": c.text,
                "start": c.start,
                "end": c.end,
                "kind": c.kind,
                "title": c.title,
                "lang": doc_lang if doc.kind != "text" else (doc.lang or guess_language(c.text) or doc_lang),
                "content_hash": hashlib.sha256(c.text.encode()).hexdigest(),
            }
            for c in chunks
        ]
        removed, added = collection.store.replace_document(
            {
                "id": doc.id,
                "source": doc.source,
                "title": doc.title,
                "content_hash": digest,
                "metadata": doc.metadata,
            },
            rows,
        )
        report.replaced += doc.id in known
        report.added += doc.id not in known
        report.passages_removed += index.remove(removed)
        pending.extend(
            (pid, embed_text(doc.title, r["text"], r["kind"])) for pid, r in zip(added, rows, strict=True)
        )
        collection.bm25_dirty = True
        if len(pending) >= batch_docs:
            flush()
    flush()
    bar.close()

    if prune_sources is not None:
        gone = [
            d
            for src in prune_sources
            for d in collection.store.document_hashes(src, exact=not src.endswith(os.sep))
            if d not in seen
        ]
        if gone:
            report.passages_removed += index.remove(collection.store.delete_documents(gone))
            report.pruned = len(gone)
            collection.bm25_dirty = True
    report.repaired = repair(collection, encoder)
    collection.commit()
    report.documents, report.passages = collection.store.counts().values()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def calibration_passages(collection: Collection, ids: list[int]) -> list[tuple[str, str | None]] | None:
    """The (text, title) of the stored passages of the one batch that calibrates a new index, whose
    pseudo-queries (`encoders.adaptor.encode_pseudo_queries`) are fitted with them; None when the batch
    is mostly source code, which calibrates on its passages alone (`encoders.adaptor.pseudo_queries_suit`)."""
    rows = {r.id: r for r in collection.store.passages(ids)}
    if not pseudo_queries_suit([r.text for r in rows.values()], [r.kind for r in rows.values()]):
        return None
    return [(rows[i].text, rows[i].title or rows[i].doc_title) if i in rows else ("", None) for i in ids]


def _input_dim(collection: Collection, encoder: Encoder) -> int | None:
    """With a Matryoshka adaptor the index takes full embeddings and truncates them itself."""
    return encoder.dim if collection.config.adaptor != "none" else None


def repair(collection: Collection, encoder: Encoder) -> int:
    """Make the vector index hold exactly the store's passages; returns how many entries changed."""
    removed, added = _sync_vectors(collection, encoder)
    return removed + added


def _sync_vectors(collection: Collection, encoder: Encoder) -> tuple[int, int]:
    """`repair`, returning (orphan vectors removed, missing passages embedded). A new index is
    calibrated on the first passages as the job's first batch would have been."""
    cfg = collection.config
    index = collection.ensure_index(cfg.dim or encoder.dim, input_dim=_input_dim(collection, encoder))
    stored = set(collection.store.passage_ids())
    indexed = set(index.row_ids[index.row_ids >= 0].tolist())
    orphans = sorted(indexed - stored)
    missing = sorted(stored - indexed)
    index.remove(orphans)
    if missing:
        rows = collection.store.passages(missing)
        texts = [embed_text(r.doc_title, r.text, r.kind) for r in rows]
        ids = np.array([r.id for r in rows], dtype=np.int64)
        vecs = encoder.encode(texts, kind="passage", dim=index.input_dim)
        first = 0
        if not index.fitted and calibrates_on_queries(cfg.adaptor, index.spec.precision):
            first = min(len(ids), CALIBRATION_PASSAGES)
            passages = calibration_passages(collection, ids[:first].tolist())
            fit_queries = (
                encode_pseudo_queries(encoder, passages, dim=index.input_dim)
                if passages is not None
                else None
            )
            index.add(ids[:first], vecs[:first], fit_queries=fit_queries)
        index.add(ids[first:], vecs[first:])
        collection.bm25_dirty = True
    return len(orphans), len(missing)


def recover(collection: Collection, encoder: Encoder) -> dict[str, Any]:
    """Make a just-opened collection consistent again after a writer was killed; run it on open.

    A job killed mid-run leaves documents committed to SQLite that the saved vector index and BM25
    lack (or still hold the passages of documents it replaced or deleted): stored but unsearchable.
    This embeds the missing passages, removes orphan vectors, rebuilds a stale BM25 and commits,
    so every stored document is fully searchable. Cheap when nothing is wrong: it compares id sets
    read from the store and the saved id maps, calls no encoder and writes no file. While another
    writer holds the collection (a running job, which repairs at its own end) it changes nothing.

    Returns {"vectors_added", "vectors_removed", "bm25_rebuilt", "skipped"}: what it did, and
    whether it stood back for a running writer, for callers to log or show."""
    report: dict[str, Any] = {
        "vectors_added": 0,
        "vectors_removed": 0,
        "bm25_rebuilt": False,
        "skipped": False,
    }
    if is_consistent(collection):
        return report
    with collection.writing(blocking=False) as owner:
        if not owner:
            report["skipped"] = True
            return report
        vectors_ok, bm25_ok = _consistency(collection)  # again: a writer may have finished meanwhile
        if not vectors_ok:
            if encoder.name != collection.config.encoder:
                raise InvalidInputError(
                    f"collection {collection.name!r} was built with {collection.config.encoder},"
                    f" not {encoder.name}: recover it with that encoder"
                )
            report["vectors_removed"], report["vectors_added"] = _sync_vectors(collection, encoder)
        if not bm25_ok:
            collection.bm25_dirty = True
        report["bm25_rebuilt"] = collection.bm25_dirty
        if not vectors_ok:
            collection.commit()
        elif collection.bm25_dirty:
            collection.rebuild_bm25()
    return report


def is_consistent(collection: Collection) -> bool:
    """Whether the saved vector and BM25 indexes hold exactly the stored passages (id maps only:
    cheap). When they do, `recover` has nothing to do and needs no encoder."""
    return all(_consistency(collection))


def _consistency(collection: Collection) -> tuple[bool, bool]:
    """(the vector index holds exactly the stored passages, so does the saved BM25 index)."""
    stored = collection.stored_ids()
    try:
        vectors_ok = np.array_equal(collection.vector_ids(), stored)
    except CorruptIndexError:
        vectors_ok = True  # not a crash's doing (saves are atomic): loading it reports the damage
    bm25 = collection.bm25_ids()
    bm25_ok = not collection.bm25_dirty and (
        np.array_equal(bm25, stored) if bm25 is not None else not len(stored)
    )
    return vectors_ok, bm25_ok


def index_paths(
    collection: Collection,
    paths: list[str | Path],
    encoder: Encoder,
    *,
    prune: bool = False,
    show_progress: bool = False,
) -> JobReport:
    """`kvrag index`: index files, folders and JSONL into the collection."""
    report = JobReport(collection.name)
    sources = [str(Path(p).expanduser().resolve()) for p in paths]
    for p in paths:
        if not Path(p).expanduser().exists():
            raise InvalidInputError(f"{p}: no such file or folder")
    prune_sources = [s + (os.sep if Path(s).is_dir() else "") for s in sources] if prune else None
    return index_documents(
        collection,
        iter_documents(list(paths), report.skipped_files),
        encoder,
        prune_sources=prune_sources,
        show_progress=show_progress,
        report=report,
    )
