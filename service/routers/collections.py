"""Collections, their documents and search: /v1/collections[...]."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from kvrag.errors import CollectionNotFoundError
from kvrag.index.collection import MAX_QUERY_CHARS, Collection, CollectionConfig, validate_name
from kvrag.index.hybrid import BM25Index
from kvrag.index.job import Document, index_documents
from kvrag.index.store import check_metadata
from kvrag.index.vector import parse_spec
from kvrag.service.deps import State
from kvrag.service.errors import ApiError, LimitExceeded
from kvrag.service.schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    DocumentOut,
    DocumentsUpsert,
    PassageOut,
    SearchHit,
    SearchRequest,
    SearchResponse,
    UpsertResult,
)
from kvrag.service.state import AppState
from kvrag.service.work import run_model_work

router = APIRouter(prefix="/v1/collections", tags=["collections"])
_SPEC_OF = {"float32": "Flat", "int8": "SQ8", "ubinary": "BFlat"}


def info(c: Collection) -> CollectionInfo:
    counts = c.store.counts()
    cfg = c.config
    return CollectionInfo(
        name=c.name,
        encoder=cfg.encoder,
        spec=cfg.spec,
        precision=parse_spec(cfg.spec).precision,  # type: ignore[arg-type]
        dim=cfg.dim,
        max_tokens=cfg.max_tokens,
        overlap_tokens=cfg.overlap_tokens,
        kv_policy=cfg.kv_policy,
        documents=counts["documents"],
        passages=counts["passages"],
    )


@router.get("", response_model=CollectionList)
async def list_collections(state: State) -> CollectionList:
    data = []
    for n in Collection.list(state.home):
        try:
            with state.lease(n) as lease:
                data.append(info(lease.collection))
        except CollectionNotFoundError:  # deleted since it was listed
            continue
    return CollectionList(data=data)


@router.post("", response_model=CollectionInfo, status_code=201)
async def create_collection(body: CollectionCreate, state: State) -> CollectionInfo:
    validate_name(body.name)
    encoder = body.encoder or state.settings.encoder
    enc = state.encoder(encoder)  # served here? loaded once
    # options the first upsert would trip over: refuse them now, not after the collection exists
    if body.overlap_tokens >= body.max_tokens:
        raise ApiError(
            422, f"overlap_tokens ({body.overlap_tokens}) must be below max_tokens ({body.max_tokens})"
        )
    if body.dim is not None and body.dim > enc.dim:
        raise ApiError(422, f"dim is {body.dim}; {encoder} has {enc.dim} dimensions")
    _check_bm25_language(body.bm25_language)
    spec = body.spec or _SPEC_OF[body.precision or "float32"]
    dim = body.dim or enc.dim
    if parse_spec(spec).precision == "ubinary" and dim % 8:
        raise ApiError(422, f"{spec} stores sign bits 8 per byte: dim must be a multiple of 8, not {dim}")
    if body.spec and body.precision and parse_spec(body.spec).precision != body.precision:
        raise ApiError(422, f"spec {body.spec!r} is {parse_spec(body.spec).precision}, not {body.precision}")
    if body.name in Collection.list(state.home):
        raise ApiError(409, f"collection {body.name!r} already exists", code="conflict")
    config = CollectionConfig(
        encoder=encoder,
        spec=spec,
        dim=body.dim,
        max_tokens=body.max_tokens,
        overlap_tokens=body.overlap_tokens,
        bm25_language=body.bm25_language,
        kv_policy=body.kv_policy,
    )

    def create() -> CollectionInfo:
        # in a worker thread: the lock may be held by a request on a collection of this name that
        # is being deleted, and the event loop must not wait for it
        with state.lock(body.name):
            if body.name in Collection.list(state.home):  # created meanwhile by another request
                raise ApiError(409, f"collection {body.name!r} already exists", code="conflict")
            c = Collection.create(state.home, body.name, config, device=state.settings.device)
            state.add_collection(c)
            return info(c)

    return await run_in_threadpool(create)


def _check_bm25_language(language: str | None) -> None:
    if not language:
        return
    try:
        BM25Index(language).build([0], ["probe"])
    except (KeyError, ValueError, UnicodeError):  # PyStemmer or bm25s has no such language
        import Stemmer

        raise ApiError(
            422,
            f"bm25_language {language!r} has no Snowball stemmer: use one of {', '.join(Stemmer.algorithms())}",
        ) from None


@router.get("/{name}", response_model=CollectionInfo)
async def get_collection(name: str, state: State) -> CollectionInfo:
    with state.lease(name) as lease:
        c = lease.collection
        return info(c)


@router.delete("/{name}", status_code=204)
async def delete_collection(name: str, state: State) -> Response:
    await run_in_threadpool(state.drop_collection, name)
    return Response(status_code=204)


def _upsert(state: AppState, c: Collection, body: DocumentsUpsert) -> UpsertResult:
    """Index the documents (collection lock held by the caller)."""
    t0 = time.perf_counter()
    encoder = state.encoder(c.config.encoder)
    docs = [
        Document(
            d.id,
            d.text,
            title=d.title,
            source=d.source,
            kind=d.kind,
            lang=d.lang,
            metadata=d.metadata,
        )
        for d in body.documents
    ]
    use_kv = body.kv and state.kv is not None
    report = index_documents(
        c, docs, encoder, compressor=state.compressor(c) if use_kv else None, kv=state.kv if use_kv else None
    )
    kv = {"kv_computed": 0, "kv_present": 0}
    if report.kv is not None:
        kv = {"kv_computed": report.kv["kv_computed"], "kv_present": report.kv["kv_present"]}
    return UpsertResult(
        collection=c.name,
        added=report.added,
        replaced=report.replaced,
        unchanged=report.unchanged,
        emptied=[s.removesuffix(" (empty)") for s in report.skipped_files if s.endswith(" (empty)")],
        passages_added=report.passages_added,
        passages_removed=report.passages_removed,
        documents=report.documents,
        passages=report.passages,
        repaired=report.repaired,
        seconds=round(time.perf_counter() - t0, 3),
        **kv,
    )


@router.post("/{name}/documents", response_model=UpsertResult)
async def upsert_documents(name: str, body: DocumentsUpsert, state: State) -> UpsertResult:
    s = state.settings
    with state.lease(name):  # 404 before anything else
        pass
    if len(body.documents) > s.max_inputs:
        raise LimitExceeded("the number of documents", len(body.documents), s.max_inputs, "max_inputs")
    ids = [d.id for d in body.documents]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "document ids repeat within the request: each id must appear once")
    for d in body.documents:
        check_metadata(d.id, d.metadata)  # all checked before any is written
        if len(d.text) > s.max_document_chars:
            raise LimitExceeded(
                f"document {d.id!r} length in characters",
                len(d.text),
                s.max_document_chars,
                "max_document_chars",
            )

    def produce(stop):
        # an upsert runs to the end even when its client hangs up: nothing half-done
        with state.lease(name) as lease, state.locked(lease) as c:
            yield _upsert(state, c, body)

    (result,) = await run_model_work(state.gate, produce)
    return result


# `:path`: document ids may hold '/' (file paths); clients send them URL-encoded (%2F) or as is
@router.get("/{name}/documents/{doc_id:path}", response_model=DocumentOut)
async def get_document(name: str, doc_id: str, state: State) -> DocumentOut:
    with state.lease(name) as lease:
        c = lease.collection
        doc = c.store.get_document(doc_id)
        if doc is None:
            raise CollectionNotFoundError(f"no document {doc_id!r} in collection {name!r}")
        rows = c.store.passages(doc["passages"])
    return DocumentOut(
        id=doc["id"],
        title=doc["title"],
        source=doc["source"],
        metadata=doc["metadata"],
        updated_at=doc["updated_at"],
        passages=[
            PassageOut(
                id=r.id, text=r.text, start=r.start, end=r.end, kind=r.kind, lang=r.lang, section=r.title
            )
            for r in rows
        ],
    )


def _delete_document(state: AppState, name: str, doc_id: str) -> None:
    with state.lease(name) as lease, state.locked(lease) as c:
        if c.store.get_document(doc_id) is None:
            raise CollectionNotFoundError(f"no document {doc_id!r} in collection {c.name!r}")
        removed = c.store.delete_documents([doc_id])
        if c.index is not None:
            c.index.remove(removed)
        c.bm25_dirty = True
        c.commit()


@router.delete("/{name}/documents/{doc_id:path}", status_code=204)
async def delete_document(name: str, doc_id: str, state: State) -> Response:
    await run_in_threadpool(_delete_document, state, name, doc_id)
    return Response(status_code=204)


def check_k(state: AppState, k: int) -> None:
    if k > state.settings.max_k:
        raise LimitExceeded("k", k, state.settings.max_k, "max_k")


def check_query(state: AppState, text: str, what: str = "the query") -> None:
    if not text.strip():
        raise ApiError(422, f"{what} is empty")
    if len(text) > state.settings.max_input_chars:
        raise LimitExceeded(
            f"{what} length in characters", len(text), state.settings.max_input_chars, "max_input_chars"
        )
    if len(text) > MAX_QUERY_CHARS:  # the index's own cap, below the setting's default
        raise ApiError(
            422, f"{what} is {len(text)} characters; a search query takes at most {MAX_QUERY_CHARS}"
        )


@router.post("/{name}/search", response_model=SearchResponse)
async def search(name: str, body: SearchRequest, state: State) -> SearchResponse:
    with state.lease(name) as lease:
        c = lease.collection
        config = c.config
    check_k(state, body.k)
    check_query(state, body.query)
    have = parse_spec(config.spec).precision
    if body.precision is not None and body.precision != have:
        raise ApiError(
            422,
            f"collection {name!r} stores {have} vectors (spec {config.spec}); precision is fixed when a "
            "collection is created: create another collection for another precision",
        )
    encoder = state.encoder(config.encoder)

    def produce(stop):
        with state.lease(name) as lease, state.locked(lease, stop) as c:
            t0 = time.perf_counter()
            hits = c.search(
                body.query, encoder, k=body.k, filter=body.filter, hybrid=body.hybrid, rescore=body.rescore
            )
            ms = (time.perf_counter() - t0) * 1000
            # a hit's metadata: its document's, overridden by the passage's own (as filters match them)
            docs = {h.doc_id: (c.store.get_document(h.doc_id) or {}).get("metadata") or {} for h in hits}
            yield hits, docs, ms

    (hits, doc_meta, ms) = (await run_model_work(state.gate, produce))[0]
    return SearchResponse(
        collection=name,
        query=body.query,
        search_ms=round(ms, 3),
        hits=[
            SearchHit(
                rank=i + 1,
                passage_id=h.passage_id,
                score=h.score,
                doc_id=h.doc_id,
                title=h.title,
                source=h.source,
                section=h.section,
                text=h.text,
                start=h.start,
                end=h.end,
                lang=h.lang,
                kind=h.kind,
                metadata={**doc_meta[h.doc_id], **h.metadata},
            )
            for i, h in enumerate(hits)
        ],
    )
