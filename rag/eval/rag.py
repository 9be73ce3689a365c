"""`kvrag eval rag`: answer SQuAD-format questions from retrieved paragraphs and score the answers.

The file's paragraphs are indexed once as a collection (with their passage KV caches in the chosen
store and codec); every question is answered from its top-k retrieved paragraphs in each requested
variant (sequential, parallel, APE with given T and S) on the same retrieval, so differences come from
the generation mode only.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.job import Document, index_documents
from kvrag.rag.eval.squad import best_score, exact_match, f1_score, load_squad
from kvrag.rag.generation.blend import DEFAULT_BLEND_RATIO
from kvrag.rag.generation.prefill import MODES, POSITIONS
from kvrag.rag.generation.sampling import SamplingParams
from kvrag.rag.kvcache.manager import KVCacheManager
from kvrag.rag.pipeline import RagPipeline, passage_text


@dataclass(frozen=True)
class Variant:
    """One way of answering: a mode, and for `ape` its temperature and scale."""

    name: str
    mode: str
    temperature: float | Sequence[float] = 1.0
    scale: float | Sequence[float] = 1.0
    positions: str = "shared"  # or "distinct": passages re-rotated to follow each other
    blend_ratio: float = DEFAULT_BLEND_RATIO  # `blend` only: fraction of passage tokens recomputed

    @classmethod
    def of(
        cls,
        mode: str,
        temperature: float,
        scale: float,
        blend_ratio: float = DEFAULT_BLEND_RATIO,
        positions: str = "shared",
    ) -> Variant:
        if mode not in MODES:
            raise InvalidInputError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if positions not in POSITIONS:
            raise InvalidInputError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        if mode in ("ape", "parallel") and positions == "distinct":
            name = f"ape(T={temperature},S={scale},distinct)" if mode == "ape" else "parallel(distinct)"
            return cls(name, mode, temperature, scale, positions)
        if mode == "ape":
            return cls(f"ape(T={temperature},S={scale})", mode, temperature, scale)
        if mode == "blend":
            if not 0.0 <= blend_ratio <= 1.0:
                raise InvalidInputError("the blend ratio must be in [0, 1]")
            return cls(f"blend(r={blend_ratio})", mode, blend_ratio=blend_ratio)
        return cls(mode, mode)


@dataclass
class RagEvalConfig:
    data: Path
    k: int = 5
    limit: int | None = None
    offset: int = 0
    max_new_tokens: int = 16
    variants: list[Variant] = field(default_factory=lambda: [Variant("ape", "ape", 0.9, 0.9)])
    compress: str | None = None  # compression method (passages compressed before their KV); None: off
    compress_rate: float = 0.5  # kept fraction of tokens
    compress_source: str | None = None  # what the compressor was made from (generator spec or path)


def collection_name(path: Path, encoder_spec: str = CollectionConfig.encoder) -> str:
    """One collection per data file and encoder."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "-" for c in Path(path).stem.lower())
    name = f"eval-{stem}-{digest}"
    if encoder_spec != CollectionConfig.encoder:
        name += "-" + hashlib.sha256(encoder_spec.encode()).hexdigest()[:8]
    return name


def open_eval_collection(
    home: Path, path: Path, encoder, encoder_spec: str, *, show_progress: bool = False
) -> Collection:
    """The file's paragraphs as a collection, built on first use (one passage per paragraph)."""
    paragraphs, _ = load_squad(path)
    name = collection_name(path, encoder_spec)
    config = CollectionConfig(encoder=encoder_spec, max_tokens=512)
    collection = Collection.open_or_create(home, name, config)
    if collection.store.counts().get("documents", 0) != len(paragraphs):
        docs = (Document(id=p.id, text=p.context, title=p.title) for p in paragraphs)
        index_documents(collection, docs, encoder, show_progress=show_progress)
    return collection


def compress_collection(
    store,
    compressor,
    method: str,
    rate: float,
    *,
    source: str | None = None,
    generator=None,
    show_progress: bool = False,
) -> dict:
    """Compress the passages of a collection's store that lack a compressed text (all of them when the
    method, rate or source changed); with a `generator`, also the mean passage tokens before and after."""
    from tqdm.auto import tqdm

    from kvrag.rag.compress import check_rate

    rate = check_rate(rate)
    t0 = time.perf_counter()
    with tqdm(desc="compressing", unit="passage", disable=not show_progress) as bar:
        report = store.compress_passages(
            lambda texts: compressor.compress(texts, rate=rate), method, rate, source, progress=bar.update
        )
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if generator is not None:
        report.update(token_figures(store, generator))
    return report


def token_figures(store, generator) -> dict:
    """Mean generator tokens of the stored passages before and after compression, and their ratio."""
    rows = store.passages(store.passage_ids())
    original = [len(generator.passage_ids(r.text, r.doc_title)) for r in rows]
    compressed = [len(generator.passage_ids(passage_text(r), r.doc_title)) for r in rows]
    n = max(len(rows), 1)
    return {
        "passage_tokens_mean_original": round(sum(original) / n, 2),
        "passage_tokens_mean_compressed": round(sum(compressed) / n, 2),
        "token_ratio": round(sum(original) / max(sum(compressed), 1), 3),
    }


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3) if xs else 0.0


def run_rag_eval(
    cfg: RagEvalConfig,
    pipeline: RagPipeline,
    *,
    show_progress: bool = False,
    compressor=None,
) -> dict:
    """Answer and score; returns one dict (per-variant results under `variants` when there are several).

    With `cfg.compress`, the collection's paragraphs are first compressed by `compressor` (kept in its
    store) and their caches computed from the compressed texts; retrieval stays on the originals."""
    from tqdm.auto import tqdm

    _, questions = load_squad(cfg.data)
    if cfg.offset < 0 or (cfg.limit is not None and cfg.limit < 1):
        raise InvalidInputError("--offset must be >= 0 and --limit >= 1")
    questions = questions[cfg.offset : cfg.offset + cfg.limit if cfg.limit else None]
    if not questions:
        raise InvalidInputError("no questions in the selected range")
    gen = pipeline.generator
    kv: KVCacheManager = pipeline.kv
    store = pipeline.collection.store
    compression = None
    if cfg.compress is not None:
        if compressor is None:
            raise InvalidInputError("compressing passages needs a compressor")
        compression = compress_collection(
            store,
            compressor,
            cfg.compress,
            cfg.compress_rate,
            source=cfg.compress_source,
            generator=gen,
            show_progress=show_progress,
        )
    pipeline.use_compressed = compression is not None
    # Precompute every paragraph's cache (indexing time), so query-time fetches are store hits.
    t0 = time.perf_counter()
    rows = store.passages(store.passage_ids())
    kv_index = kv.ensure(
        [gen.passage_ids(passage_text(r, pipeline.use_compressed), r.doc_title) for r in rows],
        progress=show_progress,
    )
    kv_index["seconds"] = round(time.perf_counter() - t0, 3)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=("\n",))
    # a variant named twice (e.g. `--mode ape` and the same T:S in --ape-grid) is run once
    variants = list({v.name: v for v in cfg.variants}.values())
    per: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}
    recall = []
    kv_bytes = []
    ctx_tokens = []
    bar = tqdm(questions, desc="questions", disable=not show_progress)
    for q in bar:
        t_r = time.perf_counter()
        hits = pipeline.retrieve(q.question, cfg.k)
        retrieval_ms = (time.perf_counter() - t_r) * 1000
        recall.append(float(any(h.doc_id == q.paragraph_id for h in hits)))
        gold_ids = gen._encode(q.answers[0])
        for v in variants:
            pipeline.ape_temperature, pipeline.ape_scale = v.temperature, v.scale
            pipeline.ape_positions = v.positions
            pipeline.blend_ratio = v.blend_ratio
            t_p = time.perf_counter()
            prep = pipeline.prepare(q.question, mode=v.mode, hits=hits, max_new_tokens=cfg.max_new_tokens)
            logps = gen.answer_logprobs(prep.session, gold_ids)
            text, stats = gen.generate(prep.session, sampling)
            # TTFT: retrieval + cache fetch (and any recompute) + prefill; the first token is the
            # arg max of the prefill's logits.
            m = per[v.name]
            m.setdefault("em", []).append(best_score(exact_match, text, q.answers))
            m.setdefault("f1", []).append(best_score(f1_score, text, q.answers))
            m.setdefault("gold_logprob", []).append(sum(logps) / len(logps) if logps else 0.0)
            m.setdefault("retrieval_ms", []).append(retrieval_ms)
            m.setdefault("kv_fetch_ms", []).append(prep.timings["kv_fetch_ms"])
            m.setdefault("prefill_ms", []).append(prep.timings["prefill_ms"])
            m.setdefault("ttft_ms", []).append(
                retrieval_ms + prep.timings["kv_fetch_ms"] + prep.timings["prefill_ms"]
            )
            m.setdefault("decode_tok_s", []).append(stats["decode_tok_s"])
            m.setdefault("answer_tokens", []).append(stats["completion_tokens"])
            m.setdefault("wall_ms", []).append((time.perf_counter() - t_p) * 1000)
            if v.mode != "sequential" and prep.kv:
                kv_bytes.append(prep.kv.get("bytes", 0))
            ctx_tokens.append(prep.session.context_tokens)
        if show_progress:
            first_v = per[variants[0].name]
            bar.set_postfix(f1=f"{sum(first_v['f1']) / len(first_v['f1']):.3f}")
    results = {}
    for v in variants:
        m = per[v.name]
        n = len(m["f1"])
        results[v.name] = {
            "mode": v.mode,
            "temperature": v.temperature,
            "scale": v.scale,
            "positions": "distinct" if v.mode == "blend" else v.positions,
            **({"blend_ratio": v.blend_ratio} if v.mode == "blend" else {}),
            "em": round(sum(m["em"]) / n, 4),
            "f1": round(sum(m["f1"]) / n, 4),
            "gold_logprob": round(sum(m["gold_logprob"]) / n, 4),
            "ttft_ms": _median(m["ttft_ms"]),
            "ttft_split_ms": {
                "retrieval": _median(m["retrieval_ms"]),
                "kv_fetch": _median(m["kv_fetch_ms"]),
                "prefill": _median(m["prefill_ms"]),
            },
            "decode_tok_s": _median(m["decode_tok_s"]),
            "answer_tokens_mean": round(sum(m["answer_tokens"]) / n, 2),
        }
    common = {
        "data": str(cfg.data),
        "questions": len(questions),
        "offset": cfg.offset,
        "k": cfg.k,
        f"recall@{cfg.k}": round(sum(recall) / len(recall), 4),
        "generator": gen.spec,
        "kv_url": kv.store.url,
        "kv_codec": kv.codec,
        "kv_blob_bytes_per_question_median": _median([float(b) for b in kv_bytes]),
        "context_tokens_median": _median([float(c) for c in ctx_tokens]),
        "kv_index": kv_index,
        "kv_counters": {k2: v2 for k2, v2 in kv.stats().items() if k2 != "store"},
    }
    if compression is not None:
        common["compression"] = compression
    if len(variants) == 1:
        return {**common, **results[variants[0].name]}
    return {**common, "variants": results}
