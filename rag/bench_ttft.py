"""`kvrag bench ttft`: time to first token of sequential prefill against APE with passage caches
loaded from a KV store, on the same k passages and questions, in one run.

Both sides start from token ids of the pieces (tokenising is the same work for both and is left
out); retrieval is left out too. Sequential TTFT is one full prefill of prefix + k passages +
question. APE TTFT is the store fetch of the k caches (one round trip), decoding the blobs, joining
them and prefilling only the question.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.eval.squad import load_squad
from kvrag.rag.generation.generator import Generator
from kvrag.rag.generation.prefill import PrefillPolicy
from kvrag.rag.kvcache.manager import KVCacheManager

DEFAULT_DATA = Path("../shared/data/xquad/xquad.en.json")
SAMPLE_DOCS = Path(__file__).resolve().parents[1] / "samples" / "docs"


def _pieces(data: Path | None, k: int, questions: int) -> tuple[list[tuple[str, str]], list[str]]:
    """k (title, text) passages and questions about them."""
    path = data if data is not None else (DEFAULT_DATA if DEFAULT_DATA.exists() else None)
    if path is not None:
        paragraphs, qs = load_squad(path)
        if len(paragraphs) < k:
            raise InvalidInputError(f"{path} has {len(paragraphs)} paragraphs; k={k} asks for more")
        chosen = paragraphs[:k]
        ids = {p.id for p in chosen}
        about = [q for q in qs if q.paragraph_id in ids]
        if not about:
            raise InvalidInputError(f"{path}: no questions about the first {k} paragraphs")
        # One question per paragraph first, then the rest, so questions spread over the passages.
        first_of: dict[str, int] = {}
        for n, q in enumerate(about):
            first_of.setdefault(q.paragraph_id, n)
        order = sorted(range(len(about)), key=lambda n: (n not in first_of.values(), n))
        return [(p.title, p.context) for p in chosen], [about[n].question for n in order][:questions]
    texts = sorted(SAMPLE_DOCS.glob("*.md"))
    if len(texts) < 1:
        raise InvalidInputError("no data: pass --data FILE (SQuAD format)")
    passages = [(f.stem, f.read_text(encoding="utf-8")) for f in texts]
    passages = (passages * (k // len(passages) + 1))[:k]
    return passages, ["What is this text about?", "Summarise the first passage."][:questions]


def run_ttft_bench(
    generator: Generator,
    kv: KVCacheManager,
    *,
    k: int = 10,
    data: Path | None = None,
    questions: int = 5,
    repeats: int = 3,
    blend_ratios: Sequence[float] = (),
) -> dict:
    """Median TTFT of sequential prefill and APE (and, for each of `blend_ratios`, the `blend` mode)
    over the same passages and questions, measured in one run, interleaved."""
    if k < 1 or questions < 1 or repeats < 1:
        raise InvalidInputError("--k, --questions and --repeats must be >= 1")
    passages, qs = _pieces(data, k, questions)
    p_ids = [generator.passage_ids(text, title) for title, text in passages]
    q_ids = [generator.question_ids(q) for q in qs]
    # Indexing time (not measured): the prefix and every passage cache are in the store.
    kv.ensure(p_ids)
    kv.prefix()
    store = kv.store

    def sequential(q: list[int]) -> float:
        t0 = time.perf_counter()
        s = generator.prefill("sequential", q, p_ids)
        int(torch.argmax(s.logits))
        return (time.perf_counter() - t0) * 1000

    fetch: list[float] = []
    decode: list[float] = []
    blob_bytes: list[int] = []

    def ape(q: list[int], ratio: float | None = None) -> float:
        t0 = time.perf_counter()
        joined, report = kv.get_joined(p_ids)
        policy = (
            PrefillPolicy("ape", 0.9, 1.0) if ratio is None else PrefillPolicy("blend", blend_ratio=ratio)
        )
        s = generator.prefill(policy, q, joined)
        int(torch.argmax(s.logits))
        total = (time.perf_counter() - t0) * 1000
        if report.misses or report.corrupt:
            raise RuntimeError(f"store {store.url} lost caches during the benchmark: {report}")
        fetch.append(report.fetch_ms)
        decode.append(report.decode_ms)
        blob_bytes.append(report.bytes)
        return total

    sequential(q_ids[0])  # warm-up: allocator, threads, first-call paths
    ape(q_ids[0])
    fetch.clear()
    decode.clear()
    blob_bytes.clear()
    seq_ms, ape_ms = [], []
    blend_ms: dict[float, list[float]] = {r: [] for r in blend_ratios}
    for _ in range(repeats):
        for q in q_ids:
            seq_ms.append(sequential(q))
            n = len(fetch)
            ape_ms.append(ape(q))
            for r in blend_ratios:
                blend_ms[r].append(ape(q, r))
            del fetch[n + 1 :], decode[n + 1 :], blob_bytes[n + 1 :]
    seq = statistics.median(seq_ms)
    ap = statistics.median(ape_ms)
    fetch_ms = statistics.median(fetch)
    nbytes = statistics.median(blob_bytes)
    return {
        "generator": generator.spec,
        "kv_url": store.url,
        "kv_codec": kv.codec,
        "k": k,
        "questions": len(q_ids),
        "repeats": repeats,
        "context_tokens": len(generator.prefix_ids) + sum(len(p) for p in p_ids),
        "question_tokens_median": statistics.median(len(q) for q in q_ids),
        "sequential_ttft_ms": round(seq, 2),
        "ape_ttft_ms": round(ap, 2),
        "speedup": round(seq / ap, 2),
        "kv_fetch_ms": round(fetch_ms, 2),
        "kv_decode_ms": round(statistics.median(decode), 2),
        "kv_bytes": int(nbytes),
        "kv_fetch_gb_s": round(nbytes / (fetch_ms / 1000) / 1e9, 3) if fetch_ms > 0 else None,
        **(
            {
                "blend": {
                    str(r): {
                        "ttft_ms": round(statistics.median(v), 2),
                        "speedup": round(seq / statistics.median(v), 2),
                    }
                    for r, v in blend_ms.items()
                }
            }
            if blend_ms
            else {}
        ),
        "device": str(generator.device),
        "torch_threads": torch.get_num_threads(),
    }
