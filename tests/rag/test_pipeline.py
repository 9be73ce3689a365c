"""RagPipeline over a small collection with the tiny encoder and the tiny generator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.job import Document, index_documents
from kvrag.rag.generation.sampling import SamplingParams
from kvrag.rag.generation.streaming import TokenEvent
from kvrag.rag.kvcache import MemoryStore, open_kv_store
from kvrag.rag.kvcache.manager import KVCacheManager
from kvrag.rag.pipeline import Citation, RagAnswer, RagPipeline
from tests.redis_util import RedisProc, redis_server_binary, start_redis_server

DOCS = [
    Document(id="garden", title="Garden", text="The garden is full of roses in the summer.", source="g.md"),
    Document(id="bees", title="Bees", text="The bees are busy all day long and make honey.", source="b.md"),
    Document(id="bridge", title="Bridge", text="The old stone bridge crosses the river near the mill."),
    Document(id="mars", title=None, text="Mars is the fourth planet from the sun, the red planet."),
    Document(
        id="harbour", title="Harbour", text="Boats come into the harbour at night when the tide is high."
    ),
]
QUESTION = "What is the garden full of in summer?"
SHORT = SamplingParams(max_new_tokens=6)
TIMING_KEYS = {"retrieval_ms", "kv_fetch_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "total_ms"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_encoder) -> Iterator[Collection]:
    home = tmp_path_factory.mktemp("rag-home")
    c = Collection.create(
        home, "kb", CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
    )
    index_documents(c, iter(DOCS), tiny_encoder)
    yield c
    c.close()


def make_pipeline(collection, encoder, generator, store=None) -> RagPipeline:
    kv = KVCacheManager(generator, store if store is not None else MemoryStore(), "fp32")
    return RagPipeline(collection, encoder, generator, kv)


@pytest.fixture
def pipeline(collection, tiny_encoder, tiny_generator) -> RagPipeline:
    return make_pipeline(collection, tiny_encoder, tiny_generator)


@pytest.fixture
def private_redis() -> Iterator[RedisProc]:
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary")
    with start_redis_server() as server:
        yield server


# ------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("mode", ["ape", "parallel", "sequential"])
def test_answer_carries_citations_timings_and_usage(pipeline: RagPipeline, mode: str) -> None:
    hits = pipeline.retrieve(QUESTION, 3)
    assert len(hits) == 3
    answer = pipeline.answer(QUESTION, k=3, mode=mode, sampling=SHORT)
    assert isinstance(answer, RagAnswer)
    assert answer.question == QUESTION and answer.mode == mode
    assert isinstance(answer.text, str) and answer.text == answer.text.strip()
    assert answer.finish_reason in ("stop", "length")

    assert all(isinstance(c, Citation) for c in answer.citations)
    assert [c.rank for c in answer.citations] == [1, 2, 3]
    assert [c.passage_id for c in answer.citations] == [h.passage_id for h in hits]
    assert [c.doc_id for c in answer.citations] == [h.doc_id for h in hits]
    assert [c.title for c in answer.citations] == [h.title for h in hits]
    assert [c.source for c in answer.citations] == [h.source for h in hits]
    assert [c.score for c in answer.citations] == [round(h.score, 6) for h in hits]
    by_id = {d.id: d for d in DOCS}
    for c in answer.citations:
        assert c.title == by_id[c.doc_id].title

    assert set(answer.timings) >= TIMING_KEYS
    assert all(v >= 0 for v in answer.timings.values())
    assert answer.timings["ttft_ms"] >= answer.timings["prefill_ms"] > 0
    assert answer.timings["ttft_ms"] <= answer.timings["total_ms"]
    gen = pipeline.generator
    prompt = (
        len(gen.prefix_ids)
        + sum(len(p) for p in pipeline.passage_ids(hits))
        + len(gen.question_ids(QUESTION))
    )
    # completion tokens, counted independently: the token events of the same (greedy) answer streamed
    streamed = pipeline.stream(QUESTION, k=3, mode=mode, sampling=SHORT)
    generated = sum(1 for e in streamed if isinstance(e, TokenEvent) and e.token_id is not None)
    assert answer.usage == {"prompt_tokens": prompt, "completion_tokens": generated}
    assert 0 <= answer.usage["completion_tokens"] <= SHORT.max_new_tokens
    if answer.finish_reason == "length":
        assert answer.usage["completion_tokens"] == SHORT.max_new_tokens
    if mode == "sequential":
        assert answer.kv == {} and answer.timings["kv_fetch_ms"] == 0
    else:
        assert answer.kv["hits"] + answer.kv["misses"] == 3
        assert answer.timings["kv_fetch_ms"] > 0
    d = answer.to_dict()
    assert d["citations"][0]["passage_id"] == hits[0].passage_id and d["text"] == answer.text


@pytest.mark.parametrize("mode", ["ape", "sequential"])
def test_stream_concatenates_to_the_answer(pipeline: RagPipeline, mode: str) -> None:
    items = list(pipeline.stream(QUESTION, k=2, mode=mode, sampling=SHORT))
    final = items[-1]
    assert isinstance(final, RagAnswer)
    events = items[:-1]
    assert events and all(isinstance(e, TokenEvent) for e in events)
    assert all(e.finish_reason is None for e in events)
    streamed = "".join(e.text for e in events)
    assert streamed.strip() == final.text
    assert final.usage["completion_tokens"] == sum(1 for e in events if e.token_id is not None)
    # greedy: the same question answers the same
    assert pipeline.answer(QUESTION, k=2, mode=mode, sampling=SHORT).text == final.text


def test_parallel_equals_sequential_for_one_passage(pipeline: RagPipeline) -> None:
    seq = pipeline.prepare(QUESTION, k=1, mode="sequential")
    par = pipeline.prepare(QUESTION, k=1, mode="parallel")
    assert [h.passage_id for h in seq.hits] == [h.passage_id for h in par.hits]
    assert seq.session.next_position == par.session.next_position
    assert seq.session.context_tokens == par.session.context_tokens
    assert seq.prompt_tokens == par.prompt_tokens
    torch.testing.assert_close(par.session.logits, seq.session.logits, atol=1e-4, rtol=0)

    sampling = SamplingParams(max_new_tokens=8)
    a_seq = pipeline.answer(QUESTION, k=1, mode="sequential", sampling=sampling)
    a_par = pipeline.answer(QUESTION, k=1, mode="parallel", sampling=sampling)
    assert a_par.text == a_seq.text
    assert a_par.usage == a_seq.usage

    # APE with T, S != 1 changes the first-token distribution
    ape = pipeline.prepare(QUESTION, k=1, mode="ape")
    assert (pipeline.ape_temperature, pipeline.ape_scale) == (0.9, 1.0)
    assert not torch.allclose(ape.session.logits, seq.session.logits, atol=1e-3)


def test_scoring_leaves_the_session_ready_to_decode(pipeline: RagPipeline) -> None:
    gen = pipeline.generator
    ref_text, _ = gen.generate(pipeline.prepare(QUESTION, k=2, mode="ape").session, SHORT)
    prep = pipeline.prepare(QUESTION, k=2, mode="ape")
    gold = gen._encode("roses in the summer")
    logps = gen.answer_logprobs(prep.session, gold)
    assert len(logps) == len(gold) and all(lp <= 0 for lp in logps)
    assert logps[0] == pytest.approx(torch.log_softmax(prep.session.logits, -1)[gold[0]].item())
    again = gen.answer_logprobs(prep.session, gold)
    assert again == pytest.approx(logps, abs=1e-5)
    text, _ = gen.generate(prep.session, SHORT)
    assert text == ref_text


# --------------------------------------------------------------------------------------------- caches


def test_second_question_over_the_same_passages_hits(collection, tiny_encoder, tiny_generator) -> None:
    pipe = make_pipeline(collection, tiny_encoder, tiny_generator)
    first = pipe.answer(QUESTION, k=3, mode="ape", sampling=SHORT)
    assert (first.kv["hits"], first.kv["misses"], first.kv["corrupt"]) == (0, 3, 0)
    assert first.kv["recompute_ms"] > 0
    hits = pipe.retrieve(QUESTION, 3)
    prep = pipe.prepare("Where do the bees live?", mode="parallel", hits=hits)
    assert (prep.kv["hits"], prep.kv["misses"], prep.kv["corrupt"]) == (3, 0, 0)
    assert prep.kv["bytes"] > 0 and prep.kv["recompute_ms"] == 0
    assert [h.passage_id for h in prep.hits] == [h.passage_id for h in hits]
    again = pipe.answer(QUESTION, k=3, mode="ape", sampling=SHORT)
    assert (again.kv["hits"], again.kv["misses"]) == (3, 0)
    assert again.text == first.text
    assert pipe.kv.counters["hits"] == 6 and pipe.kv.counters["misses"] == 3


def test_precomputed_caches_give_the_same_answer(collection, tiny_encoder, tiny_generator) -> None:
    cold = make_pipeline(collection, tiny_encoder, tiny_generator)
    warm = make_pipeline(collection, tiny_encoder, tiny_generator)
    rows = collection.store.passages(collection.store.passage_ids())
    out = warm.kv.ensure([tiny_generator.passage_ids(r.text, r.doc_title) for r in rows])
    assert out["kv_computed"] == len(rows)
    a = warm.answer(QUESTION, k=4, mode="ape", sampling=SHORT)
    assert (a.kv["hits"], a.kv["misses"]) == (4, 0)
    b = cold.answer(QUESTION, k=4, mode="ape", sampling=SHORT)
    assert (b.kv["hits"], b.kv["misses"]) == (0, 4)
    assert a.text == b.text


# --------------------------------------------------------------------------------------------- errors


def test_invalid_requests(pipeline: RagPipeline) -> None:
    with pytest.raises(InvalidInputError, match="mode"):
        pipeline.answer(QUESTION, mode="beam")
    with pytest.raises(InvalidInputError, match="mode"):
        pipeline.prepare(QUESTION, mode="")
    with pytest.raises(InvalidInputError, match="k must be"):
        pipeline.answer(QUESTION, k=0)
    with pytest.raises(InvalidInputError, match="k must be"):
        pipeline.retrieve(QUESTION, 0)
    for empty in ("", "   ", "\n\t"):
        with pytest.raises(InvalidInputError):
            pipeline.answer(empty, k=2)
    with pytest.raises(InvalidInputError):
        list(pipeline.stream("  ", k=2, mode="sequential"))
    with pytest.raises(InvalidInputError):
        SamplingParams(max_new_tokens=0)


# ---------------------------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_redis_stopped_mid_run(collection, tiny_encoder, tiny_generator, private_redis: RedisProc) -> None:
    store = open_kv_store(private_redis.url + "?timeout=0.3")
    try:
        pipe = make_pipeline(collection, tiny_encoder, tiny_generator, store)
        first = pipe.answer(QUESTION, k=3, mode="ape", sampling=SHORT)
        assert first.kv["misses"] == 3
        warm = pipe.answer(QUESTION, k=3, mode="ape", sampling=SHORT)
        assert (warm.kv["hits"], warm.kv["misses"]) == (3, 0)
        assert store.stats()["errors"] == 0

        private_redis.stop()
        after = pipe.answer(QUESTION, k=3, mode="ape", sampling=SHORT)
        assert after.text == first.text
        assert after.kv["misses"] > 0 and after.kv["hits"] == 0
        assert [c.passage_id for c in after.citations] == [c.passage_id for c in first.citations]
        assert store.stats()["errors"] > 0
        # the sequential path needs no store at all
        seq = pipe.answer(QUESTION, k=3, mode="sequential", sampling=SHORT)
        assert seq.kv == {}
    finally:
        store.close()
