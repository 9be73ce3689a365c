"""The batch indexing job: read files and JSONL, and run the ingest plan (`index.ingest`) on them in
this process (the local executor; `index.ray_job` is the other).

Idempotent: a document whose content hash is unchanged is skipped, a changed one is replaced, and
`prune=True` deletes documents whose source file is gone. Resumable: passages committed to SQLite
but missing from the vector index (a crash between the two) are embedded on the next run, and
vectors whose passage is gone are removed. `recover`, run when a collection is opened, does the
same without waiting for a next run, so that a killed job leaves no stored document unsearchable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kvrag.encoders.encoder import Encoder
from kvrag.errors import CorruptIndexError, InvalidInputError
from kvrag.index.collection import Collection
from kvrag.index.ingest import (
    GROUP_PASSAGES,
    Compression,
    Document,
    IngestPlan,
    JobReport,
    KVPrecompute,
    PassageCompressor,
    input_dim,
)

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
CALIBRATION_PASSAGES = 256  # passages a repair calibrates a new index on (the job's first batch)


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


def index_documents(
    collection: Collection,
    docs: Iterable[Document],
    encoder: Encoder,
    *,
    prune_sources: list[str] | None = None,
    batch_docs: int = GROUP_PASSAGES,
    show_progress: bool = False,
    report: JobReport | None = None,
    compression: Compression | None = None,
    compressor: PassageCompressor | None = None,
    kv: KVPrecompute | None = None,
    everything: bool = False,
) -> JobReport:
    """The local executor: every step of the ingest plan (`index.ingest`) in this process, holding
    the collection's writer lock.

    `compression` changes the collection's compression settings (None keeps the recorded ones);
    `compressor` makes the compressed texts (None leaves passages uncompressed for now: their KV is
    then computed from the original text, as the query side will look it up); `kv` stores the
    passage KV caches (of an `eager` collection: a `lazy` one gets them on first retrieval); `everything` (a full job rather than an upsert) also compresses and caches
    passages an earlier run left without, not only this run's new ones. `batch_docs` passages form
    one vector group."""
    with collection.writing():
        plan = IngestPlan(collection, compression=compression, report=report)
        t0 = time.perf_counter()
        _store_and_embed(plan, docs, encoder, batch_docs, show_progress)
        if prune_sources is not None:
            plan.prune(prune_sources)
        repaired = repair(collection, encoder)
        if compressor is not None:
            ids, texts = plan.compression_todo(everything=everything)
            plan.report.compression = compress_passages(plan, compressor, ids, texts, show_progress)
        if kv is not None and plan.config.kv_policy == "eager":
            items = plan.kv_items(plan.kv_ids(everything=everything))
            plan.report.kv = kv.ensure_texts(items, progress=show_progress)
        plan.finish(repaired)
        plan.report.seconds = round(time.perf_counter() - t0, 3)
        return plan.report


def _store_and_embed(
    plan: IngestPlan, docs: Iterable[Document], encoder: Encoder, group: int, show_progress: bool
) -> None:
    """triage -> rows -> store for each document, embedding the new passages in groups."""
    from tqdm.auto import tqdm

    pending: list[int] = []
    # the index exists from the start (an empty collection keeps an empty index once committed);
    # the encoder is asked for the dimension it takes (truncated, or full before an adaptor)
    index = plan.collection.ensure_index(
        plan.config.dim or encoder.dim, input_dim=plan.input_dim(encoder.dim)
    )
    dim = index.input_dim

    def flush() -> None:
        if pending:
            vecs = encoder.encode(plan.embed_texts(pending), kind="passage", dim=dim, show_progress=False)
            plan.add_vectors(pending, vecs, lambda: encoder)
            pending.clear()

    with tqdm(desc=f"index {plan.collection.name}", unit="doc", disable=not show_progress) as bar:
        for doc in docs:
            bar.update(1)
            digest = plan.triage(doc)
            if digest is None:
                continue
            pending += plan.store_document(doc, digest, plan.rows(doc, encoder.count_tokens))
            if len(pending) >= group:
                flush()
        flush()


def compress_passages(
    plan: IngestPlan,
    compressor: PassageCompressor,
    ids: list[int],
    texts: list[str],
    show_progress: bool = False,
    batch: int = 64,
) -> dict:
    """The compress step: compressed texts for `ids` (their original `texts`), stored in batches."""
    from tqdm.auto import tqdm

    assert plan.compression is not None
    rate = plan.compression.rate
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc="compressing", unit="passage", disable=not show_progress) as bar:
        plan.store.compress_ids(
            ids, texts, lambda chunk: compressor.compress(chunk, rate=rate), batch=batch, progress=bar.update
        )
    return {
        "method": plan.compression.method,
        "rate": float(rate),
        "compressed": len(ids),
        "reused": plan.store.counts()["passages"] - len(ids),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def repair(collection: Collection, encoder: Encoder) -> int:
    """Make the vector index hold exactly the store's passages; returns how many entries changed.

    The usual case, nothing to repair, is told apart cheaply: the index holds as many live vectors
    as the store holds passages, and the newest stored passage is among them. Passage ids only grow,
    and a run embeds its passages in the order it stores them, so what a killed run leaves behind
    (the newest passages not embedded) or a count that differs sends it to the full comparison."""
    cfg = collection.config
    index = collection.ensure_index(
        cfg.dim or encoder.dim, input_dim=input_dim(collection.config, encoder.dim)
    )
    newest = collection.store.max_passage_id()
    if index.ntotal == collection.store.counts()["passages"] and (newest is None or index.has_id(newest)):
        return 0
    removed, added = _sync_vectors(collection, encoder)
    return removed + added


def _sync_vectors(collection: Collection, encoder: Encoder) -> tuple[int, int]:
    """`repair`, returning (orphan vectors removed, missing passages embedded). A new index is
    calibrated on the first passages as the job's first batch would have been."""
    cfg = collection.config
    index = collection.ensure_index(
        cfg.dim or encoder.dim, input_dim=input_dim(collection.config, encoder.dim)
    )
    stored = collection.stored_ids()
    indexed = index.row_ids[index.row_ids >= 0]
    orphans = np.setdiff1d(indexed, stored, assume_unique=True).tolist()
    missing = np.setdiff1d(stored, indexed, assume_unique=True).tolist()
    index.remove(orphans)
    if missing:
        plan = IngestPlan(collection)
        vecs = encoder.encode(plan.embed_texts(missing), kind="passage", dim=index.input_dim)
        first = len(missing) if index.fitted else min(len(missing), CALIBRATION_PASSAGES)
        plan.add_vectors(missing[:first], vecs[:first], lambda: encoder)
        if first < len(missing):
            plan.add_vectors(missing[first:], vecs[first:], lambda: encoder)
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
            collection.update_bm25()  # what changed since it was in step (a rebuild if unusable)
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
    compression: Compression | None = None,
    compressor: PassageCompressor | None = None,
    kv: KVPrecompute | None = None,
) -> JobReport:
    """`kvrag index`: index files, folders and JSONL into the collection (a full job: see
    `index_documents` for the compression and KV options)."""
    report = JobReport(collection.name)
    for p in paths:
        if not Path(p).expanduser().exists():
            raise InvalidInputError(f"{p}: no such file or folder")
    return index_documents(
        collection,
        iter_documents(list(paths), report.skipped_files),
        encoder,
        prune_sources=prune_sources(paths) if prune else None,
        show_progress=show_progress,
        report=report,
        compression=compression,
        compressor=compressor,
        kv=kv,
        everything=True,
    )


def prune_sources(paths: Iterable[str | Path]) -> list[str]:
    """The sources `prune` compares stored documents with: resolved paths, folders ending with the
    path separator (a stored source under one is pruned when its file is gone)."""
    sources = [str(Path(p).expanduser().resolve()) for p in paths]
    return [s + (os.sep if Path(s).is_dir() else "") for s in sources]
