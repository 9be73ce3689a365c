"""`kvrag eval retrieval`: BEIR-layout retrieval quality and speed for one index configuration.

Documents are embedded whole (the encoder truncates at its token limit, as MTEB does) through the
embedding cache, so trying several precisions or dimensions re-encodes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.encoders.adaptor import check_method, encode_pseudo_queries, pseudo_queries_suit
from kvrag.encoders.compress import truncate
from kvrag.encoders.encoder import EncoderConfig, load_encoder
from kvrag.errors import InvalidInputError
from kvrag.index.hybrid import BM25Index, rrf
from kvrag.index.vector import VectorIndex, calibrates_on_queries
from kvrag.rag.eval.beir import doc_text, evaluate, load_beir

DEFAULT_SPECS = {"float32": "Flat", "int8": "SQ8", "ubinary": "BFlat"}


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """One evaluation run."""

    data: Path
    corpus: Path | None = None
    precision: str = "float32"
    spec: str | None = None
    dim: int | None = None
    rescore: int = 1
    rescore_with: str = "float32"
    binary_method: str = "itq"
    adaptor: str = "none"  # Matryoshka adaptor fitted on the corpus embeddings: none, pca, learned
    # fit the adaptor / binary rotation on passages together with pseudo-queries made from the corpus
    # itself (titles or first sentences, embedded as queries; not for source code: see encoders.adaptor)
    pseudo_queries: bool = True
    hybrid: bool = False
    bm25_language: str | None = None
    depth: int = 100
    limit: int | None = None


def run_retrieval_eval(
    cfg: RetrievalEvalConfig, encoder_config: EncoderConfig, *, show_progress: bool = False
) -> dict:
    """Index the corpus, answer every query one at a time, and score the rankings."""
    if cfg.precision not in DEFAULT_SPECS:
        raise InvalidInputError(f"precision must be one of {', '.join(DEFAULT_SPECS)}")
    check_method(cfg.adaptor)
    data = load_beir(cfg.data, corpus_dir=cfg.corpus)
    doc_ids = list(data.corpus)
    texts = [doc_text(data.corpus[d]) for d in doc_ids]
    query_ids = sorted(data.queries)[: cfg.limit] if cfg.limit else sorted(data.queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    encoder = load_encoder(encoder_config)

    t0 = time.perf_counter()
    doc_emb = encoder.encode(texts, kind="passage", show_progress=show_progress)
    encode_s = time.perf_counter() - t0
    dim = cfg.dim or encoder.dim
    spec = cfg.spec or DEFAULT_SPECS[cfg.precision]
    adapted = cfg.adaptor != "none"
    index = VectorIndex(
        spec,
        dim,
        encoder=encoder.name,
        rescore_with=cfg.rescore_with,
        binary_method=cfg.binary_method,
        adaptor=cfg.adaptor,
        input_dim=encoder.dim if adapted else None,
    )
    if index.spec.precision != cfg.precision:
        raise InvalidInputError(f"spec {spec} stores {index.spec.precision} codes, not {cfg.precision}")
    t0 = time.perf_counter()
    fit_queries = None
    if (
        cfg.pseudo_queries
        and calibrates_on_queries(cfg.adaptor, index.spec.precision)
        and pseudo_queries_suit(texts)
    ):
        fit_queries = encode_pseudo_queries(
            encoder,
            [(d.get("text", ""), d.get("title")) for d in data.corpus.values()],
            show_progress=show_progress,
        )
        fit_queries = fit_queries if adapted else truncate(fit_queries, dim)
    # with an adaptor the index fits it on the full embeddings, then adapts and truncates them itself
    index.add(
        np.arange(len(doc_ids)), doc_emb if adapted else truncate(doc_emb, dim), fit_queries=fit_queries
    )
    build_s = time.perf_counter() - t0
    bm25 = None
    if cfg.hybrid:
        bm25 = BM25Index(cfg.bm25_language)
        bm25.build(range(len(doc_ids)), texts)

    results: dict[str, list[str]] = {}
    latencies, search_latencies = [], []
    # Queries bypass the embedding cache so that every run pays (and reports) the real encode cost.
    query_encoder = getattr(encoder, "inner", encoder)
    depth = max(cfg.depth, 100)
    for qid in query_ids:
        text = data.queries[qid]
        t = time.perf_counter()
        q = query_encoder.encode([text], kind="query", dim=index.input_dim)
        t_search = time.perf_counter()
        scores, ids = index.search(q, depth, rescore=cfg.rescore)
        ranked = [int(i) for i in ids[0] if i >= 0]
        if bm25 is not None:
            _, lex = bm25.search([text], depth)
            ranked = [pid for pid, _ in rrf([ranked, [int(i) for i in lex[0] if i >= 0]], depth)]
        latencies.append(time.perf_counter() - t)
        search_latencies.append(time.perf_counter() - t_search)
        results[qid] = [doc_ids[i] for i in ranked]

    metrics = evaluate(results, qrels, ks=(10, 100))
    bytes_index = index.index_bytes()
    return {
        **{k: round(v, 4) for k, v in metrics.items()},
        "queries": len(query_ids),
        "docs": len(doc_ids),
        "encoder": encoder.name,
        "precision": cfg.precision,
        "spec": spec,
        "dim": dim,
        "rescore": cfg.rescore,
        "rescore_with": cfg.rescore_with if cfg.rescore > 1 else None,
        "binary_method": cfg.binary_method if cfg.precision == "ubinary" else None,
        "rotation": (
            ("itq" if cfg.binary_method == "itq" else "none") if cfg.precision == "ubinary" else None
        ),
        "adaptor": cfg.adaptor,
        "pseudo_queries": fit_queries is not None,
        "hybrid": cfg.hybrid,
        "index_bytes": bytes_index,
        "bytes_per_vector": round(bytes_index / max(1, len(doc_ids)), 2),
        "ms_per_query": round(
            1000 * float(np.mean(latencies)), 3
        ),  # encode the query + search (+ BM25, fusion)
        "search_ms_per_query": round(1000 * float(np.mean(search_latencies)), 3),
        "encode_seconds": round(encode_s, 2),
        "build_seconds": round(build_s, 3),
        "data": str(cfg.data),
        "corpus": str(cfg.corpus) if cfg.corpus else None,
    }
