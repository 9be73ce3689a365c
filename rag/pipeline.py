"""Retrieve, load passage caches, answer: the query path shared by the CLI, the evaluation and the API."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvrag.encoders.encoder import Encoder
from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, Hit
from kvrag.index.ingest import kv_text
from kvrag.rag.generation.blend import DEFAULT_BLEND_RATIO
from kvrag.rag.generation.generator import Generator
from kvrag.rag.generation.prefill import PrefillPolicy, Session
from kvrag.rag.generation.sampling import SamplingParams
from kvrag.rag.generation.streaming import TokenEvent
from kvrag.rag.kvcache.manager import KVCacheManager


def passage_text(passage, use_compressed: bool = True) -> str:
    """The text a passage's KV is computed from: a `Hit` or `PassageRow`'s compressed text when it has
    one (and `use_compressed`), else its original text."""
    compressed = getattr(passage, "compressed", None) if use_compressed else None
    return kv_text(passage.text, compressed)


@dataclass
class Citation:
    """Where an answer's context came from."""

    rank: int
    passage_id: int
    doc_id: str
    title: str | None
    source: str | None
    score: float

    @classmethod
    def of(cls, rank: int, hit: Hit) -> Citation:
        return cls(rank, hit.passage_id, hit.doc_id, hit.title, hit.source, round(hit.score, 6))


@dataclass
class RagAnswer:
    question: str
    text: str
    mode: str
    citations: list[Citation]
    finish_reason: str
    timings: dict[str, float]
    usage: dict[str, int]
    kv: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """A question ready to decode, with what it cost so far."""

    session: Session
    hits: list[Hit]
    timings: dict[str, float]
    kv: dict[str, Any]
    prompt_tokens: int


class RagPipeline:
    """One collection, its encoder, the generator and the KV caches."""

    def __init__(
        self,
        collection: Collection,
        encoder: Encoder,
        generator: Generator,
        kv: KVCacheManager,
        *,
        ape_temperature: float | Sequence[float] = 0.9,
        ape_scale: float | Sequence[float] = 1.0,
        ape_positions: str = "shared",
        blend_ratio: float = DEFAULT_BLEND_RATIO,
        use_compressed: bool = True,
    ):
        self.collection = collection
        self.encoder = encoder
        self.generator = generator
        self.kv = kv
        self.ape_temperature = ape_temperature
        self.ape_scale = ape_scale
        self.ape_positions = ape_positions
        self.blend_ratio = blend_ratio
        # A passage's KV is computed from its compressed text when the collection stores one.
        self.use_compressed = use_compressed

    def retrieve(
        self, question: str, k: int, *, filter: dict | None = None, hybrid: bool = False
    ) -> list[Hit]:
        if k < 1:
            raise InvalidInputError("k must be >= 1")
        return self.collection.search(question, self.encoder, k=k, filter=filter, hybrid=hybrid)

    def passage_ids(self, hits: Sequence[Hit]) -> list[list[int]]:
        """The generator's token ids of each hit: its compressed text where there is one (the text its
        stored cache was computed from), else its original text."""
        return [self.generator.passage_ids(passage_text(h, self.use_compressed), h.title) for h in hits]

    def prepare(
        self,
        question: str,
        *,
        k: int = 5,
        mode: str = "ape",
        filter: dict | None = None,
        hybrid: bool = False,
        hits: list[Hit] | None = None,
        max_new_tokens: int = 0,
    ) -> Prepared:
        """Retrieve (unless `hits` are given), fetch caches and prefill. Timings in ms."""
        policy = PrefillPolicy(
            mode,
            temperature=self.ape_temperature,
            scale=self.ape_scale,
            positions=self.ape_positions,
            blend_ratio=self.blend_ratio,
        )
        q_ids = self.generator.question_ids(question)
        t0 = time.perf_counter()
        if hits is None:
            hits = self.retrieve(question, k, filter=filter, hybrid=hybrid)
        t1 = time.perf_counter()
        p_ids = self.passage_ids(hits)
        kv_info: dict[str, Any] = {}
        if mode == "sequential":
            session = self.generator.prefill(policy, q_ids, p_ids, max_new_tokens=max_new_tokens)
            fetch_ms = 0.0
        else:
            joined, report = self.kv.get_joined(p_ids)
            fetch_ms = report.fetch_ms + report.decode_ms + report.compute_ms
            kv_info = {
                "hits": report.hits,
                "misses": report.misses,
                "corrupt": report.corrupt,
                "bytes": report.bytes,
                "fetch_ms": round(report.fetch_ms, 3),
                "decode_ms": round(report.decode_ms, 3),
                "recompute_ms": round(report.compute_ms, 3),
            }
            session = self.generator.prefill(policy, q_ids, joined, max_new_tokens=max_new_tokens)
        timings = {
            "retrieval_ms": (t1 - t0) * 1000,
            "kv_fetch_ms": fetch_ms,
            "prefill_ms": session.prefill_ms,
        }
        return Prepared(session, hits, timings, kv_info, session.context_tokens + len(q_ids))

    def stream(
        self,
        question: str,
        *,
        k: int = 5,
        mode: str = "ape",
        filter: dict | None = None,
        hybrid: bool = False,
        sampling: SamplingParams | None = None,
    ) -> Iterator[TokenEvent | RagAnswer]:
        """Token events as they come, then the full `RagAnswer` as the last item."""
        sampling = sampling or SamplingParams()
        t0 = time.perf_counter()
        prep = self.prepare(
            question, k=k, mode=mode, filter=filter, hybrid=hybrid, max_new_tokens=sampling.max_new_tokens
        )
        ttft = None
        final: TokenEvent | None = None
        for event in self.generator.stream(prep.session, sampling):
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
            if event.finish_reason is not None:
                final = event
                break
            yield event
        assert final is not None
        timings = {k2: round(v, 3) for k2, v in prep.timings.items()}
        timings["ttft_ms"] = round(ttft or 0.0, 3)
        timings["decode_tok_s"] = round(final.stats["decode_tok_s"], 3)
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        yield RagAnswer(
            question=question,
            text=final.stats["text"].strip(),
            mode=mode,
            citations=[Citation.of(i + 1, h) for i, h in enumerate(prep.hits)],
            finish_reason=final.finish_reason or "stop",
            timings=timings,
            usage={
                "prompt_tokens": prep.prompt_tokens,
                "completion_tokens": final.stats["completion_tokens"],
            },
            kv=prep.kv,
        )

    def answer(self, question: str, **kwargs) -> RagAnswer:
        for item in self.stream(question, **kwargs):
            if isinstance(item, RagAnswer):
                return item
        raise RuntimeError("no answer produced")  # pragma: no cover
