"""The encoder on a tiny random model: batching, prompts, truncation, cache."""

from __future__ import annotations

import numpy as np
import pytest

from kvrag.encoders.encoder import CachedEncoder, EmbeddingCache
from kvrag.errors import InvalidInputError

TEXTS = [
    "short",
    "a somewhat longer sentence about the water cycle and rain",
    "Der Wasserkreislauf beschreibt, wie Wasser verdunstet, Wolken bildet und als Regen fällt.",
    "x " * 60,
    "茶起源于中国",
]


def test_encode_matches_per_text_encoding_and_is_normalised(tiny_encoder):
    batched = tiny_encoder.encode(TEXTS)
    assert batched.shape == (len(TEXTS), 32) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    single = np.stack([tiny_encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)  # length sorting must not reorder outputs


def test_matches_sentence_transformers_encode(tiny_encoder):
    ref = tiny_encoder.model.encode(
        TEXTS, prompt="passage: ", normalize_embeddings=True, convert_to_numpy=True
    )
    np.testing.assert_allclose(tiny_encoder.encode(TEXTS), ref, atol=1e-5)


def test_query_and_passage_prompts_differ(tiny_encoder):
    q = tiny_encoder.encode(["rain"], kind="query")
    p = tiny_encoder.encode(["rain"], kind="passage")
    assert float(q[0] @ p[0]) < 0.9999
    with pytest.raises(InvalidInputError):
        tiny_encoder.encode(["rain"], kind="document")


def test_matryoshka_truncation_renormalises(tiny_encoder):
    full = tiny_encoder.encode(TEXTS)
    cut = tiny_encoder.encode(TEXTS, dim=8)
    assert cut.shape == (len(TEXTS), 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)


@pytest.mark.parametrize("bad", [[""], ["ok", "   "], [None], "a string"])
def test_bad_inputs_raise_typed_errors(tiny_encoder, bad):
    with pytest.raises(InvalidInputError):
        tiny_encoder.encode(bad)


def test_batches_respect_token_budget_and_sort_by_length(tiny_encoder):
    lengths = [5, 100, 7, 60, 60, 3, 90]
    groups = tiny_encoder.batches(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)
    for g in groups:
        assert max(lengths[i] for i in g) * len(g) <= tiny_encoder.config.batch_tokens or len(g) == 1


def test_count_tokens(tiny_encoder):
    assert tiny_encoder.count_tokens(["hello world", "hello"]) == [2, 1]
    assert tiny_encoder.count_tokens([]) == []


def test_cached_encoder_hits_and_stores_raw_float32(tiny_encoder, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    enc = CachedEncoder(tiny_encoder, cache)
    first = enc.encode(TEXTS)
    assert (enc.hits, enc.misses) == (0, len(TEXTS))
    second = enc.encode(TEXTS[::-1])
    assert (enc.hits, enc.misses) == (len(TEXTS), len(TEXTS))
    np.testing.assert_allclose(second[::-1], first, atol=1e-6)
    enc.encode(TEXTS[:1], kind="query")  # another kind is another key
    assert enc.misses == len(TEXTS) + 1
    blobs = [row[0] for row in cache._db.execute("SELECT vec FROM emb")]
    assert all(len(b) == 4 * tiny_encoder.dim for b in blobs)
    np.testing.assert_allclose(enc.encode(TEXTS, dim=8), tiny_encoder.encode(TEXTS, dim=8), atol=1e-5)
