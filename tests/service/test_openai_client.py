"""The official `openai` Python client against a live `kvrag serve` (tiny models, API key `test-key`,
collection `docs`): embeddings, chat completions streamed and not, and errors as the client's types."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.service.conftest import DOCS

openai = pytest.importorskip("openai")

DOC_IDS = {d["id"] for d in DOCS}
QUESTION = "How many moons does Mars have?"
MESSAGES = [
    {"role": "system", "content": "Answer from the passages."},
    {"role": "user", "content": QUESTION},
]


@pytest.fixture(scope="module")
def oai(live_server):
    return openai.OpenAI(base_url=live_server + "/v1", api_key="test-key", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def encoder_spec(live_server) -> str:
    r = httpx.get(live_server + "/readyz", timeout=10)
    assert r.status_code == 200
    return r.json()["models"]["encoder"]


def test_embeddings_with_dimensions(oai, encoder_spec):
    texts = ["The bridge was built by masons.", "Mars has two moons.", "Tomatoes need sun."]
    # the client asks for base64 unless told otherwise, and decodes it to floats
    decoded = oai.embeddings.create(model=encoder_spec, input=texts, dimensions=16)
    assert decoded.model == encoder_spec
    assert [d.index for d in decoded.data] == [0, 1, 2]
    vecs = np.array([d.embedding for d in decoded.data])
    assert vecs.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert decoded.usage.prompt_tokens > 0 and decoded.usage.total_tokens == decoded.usage.prompt_tokens

    plain = oai.embeddings.create(model=encoder_spec, input=texts, dimensions=16, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in plain.data], vecs, atol=1e-6)
    full = oai.embeddings.create(model=encoder_spec, input=texts[1], encoding_format="float")
    head = np.array(full.data[0].embedding[:16])
    np.testing.assert_allclose(vecs[1], head / np.linalg.norm(head), atol=1e-5)
    # kvrag's extensions travel in extra_body
    packed = oai.embeddings.create(
        model=encoder_spec, input=texts, encoding_format="float", extra_body={"precision": "ubinary"}
    )
    assert [len(d.embedding) for d in packed.data] == [4, 4, 4]


def chat(oai, **kw):
    extra = {"collection": "docs", "k": 2, **kw.pop("extra", {})}
    return oai.chat.completions.create(model="kvrag", messages=MESSAGES, max_tokens=8, extra_body=extra, **kw)


def test_chat_completion(oai):
    resp = chat(oai)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.completion_tokens <= 8
    extra = resp.model_extra
    cites = extra["citations"]
    assert 1 <= len(cites) <= 2
    assert all(c["doc_id"] in DOC_IDS for c in cites)
    assert [c["rank"] for c in cites] == list(range(1, len(cites) + 1))
    assert extra["kvrag"]["collection"] == "docs" and extra["kvrag"]["mode"] == "ape"
    assert "ttft_ms" in extra["kvrag"]["timings"]


def test_chat_stream_matches_the_plain_answer(oai):
    plain = chat(oai, extra={"mode": "parallel"})
    chunks = list(chat(oai, stream=True, extra={"mode": "parallel"}))
    assert len(chunks) >= 2
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == plain.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    assert final.usage is not None and final.usage.completion_tokens == plain.usage.completion_tokens
    assert final.model_extra["citations"] == plain.model_extra["citations"]
    assert all("citations" not in (c.model_extra or {}) for c in chunks[:-1])


def test_wrong_api_key_is_an_authentication_error(live_server):
    bad = openai.OpenAI(base_url=live_server + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="kvrag", messages=MESSAGES, extra_body={"collection": "docs"})
    assert info.value.status_code == 401
    assert "API key" in info.value.message
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="x", input="x")


@pytest.mark.parametrize("stream", [False, True])
def test_limit_violation_names_the_setting(oai, stream):
    with pytest.raises((openai.UnprocessableEntityError, openai.BadRequestError)) as info:
        chat(oai, stream=stream, extra={"k": 999})
    assert info.value.status_code == 422
    assert "KVRAG_MAX_K" in info.value.message
    with pytest.raises((openai.UnprocessableEntityError, openai.BadRequestError)) as info:
        oai.chat.completions.create(
            model="kvrag", messages=MESSAGES, max_tokens=100_000, extra_body={"collection": "docs"}
        )
    assert "KVRAG_MAX_TOKENS" in info.value.message


def test_unknown_collection_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as info:
        chat(oai, extra={"collection": "no-such-collection"})
    assert "no-such-collection" in info.value.message


def test_unknown_embedding_model_is_unprocessable(oai):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert "text-embedding-3-small" in info.value.message
