"""KVCacheManager: cache keys, fetch/recompute/write-back over every store, corruption and outages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvrag.rag.generation.cache import KV, JoinedContext
from kvrag.rag.generation.generator import Generator
from kvrag.rag.kvcache import FileStore, KVStore, MemoryStore, RedisStore, decode_kv, open_kv_store
from kvrag.rag.kvcache.keys import KEY_PREFIX, LAYOUT_VERSION, PassageKVKey
from kvrag.rag.kvcache.manager import KVCacheManager

TEXTS = [
    ("Garden", "The garden is full of roses in the summer and the bees are busy all day long."),
    ("Bridge", "The old stone bridge crosses the river near the mill."),
    (None, "Mars is the fourth planet from the sun."),
    ("Harbour", "Boats come into the harbour at night when the tide is high and the wind is calm again."),
]


# ----------------------------------------------------------------------------------------------- helpers


def passages_of(gen: Generator) -> list[list[int]]:
    return [gen.passage_ids(text, title) for title, text in TEXTS]


def reference(mgr: KVCacheManager, passages: Sequence[Sequence[int]]) -> list[KV]:
    """What the manager computes on a miss: the same call, the same batching."""
    return mgr.generator.encode_passages(
        passages, mgr.generator.encode_prefix(), batch_tokens=mgr.batch_tokens
    )


def assert_same(a: KV, b: KV) -> None:
    assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
    assert torch.equal(a.keys, b.keys)
    assert torch.equal(a.values, b.values)


def assert_close(a: KV, b: KV, atol: float) -> None:
    assert a.keys.shape == b.keys.shape
    torch.testing.assert_close(a.keys, b.keys, atol=atol, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=atol, rtol=0)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    s: KVStore = MemoryStore(64 << 20) if request.param == "memory" else FileStore(tmp_path / "kv")
    yield s
    s.close()


def overwrite(store: KVStore, key: str, blob: bytes) -> None:
    """Replace a stored blob behind the manager's back (the file itself for a file store)."""
    if isinstance(store, FileStore):
        path = store.path_for(key)
        assert path.is_file()
        path.write_bytes(blob)
    else:
        store.put_many({key: blob})


def stored(store: KVStore, key: str) -> bytes:
    blob = store.get_many([key])[0]
    assert blob is not None
    return blob


@pytest.fixture(scope="module")
def other_generator(tmp_path_factory) -> Generator:
    """Same architecture and tokenizer as `tiny_generator`, other random weights."""
    from tests.conftest import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)
    return Generator(str(folder), models_dir=tmp_path_factory.mktemp("models-other"))


# ---------------------------------------------------------------------------------------------- keys


def test_key_is_stable_for_equal_inputs() -> None:
    a = PassageKVKey.of("m", "fp16", [1, 2, 3], [4, 5])
    b = PassageKVKey.of("m", "fp16", (1, 2, 3), (4, 5))
    assert a == b
    assert a.digest == b.digest and a.key == b.key
    assert a.key == f"{KEY_PREFIX}p:{a.digest}"


def test_key_is_the_same_in_another_process() -> None:
    """Stored caches are shared between processes (the server, indexing jobs, Ray workers): a key
    must not depend on anything per-process, such as Python's salted `hash()`."""
    import os
    import subprocess
    import sys

    code = (
        "from kvrag.rag.kvcache.keys import PassageKVKey;"
        "print(PassageKVKey.of('m', 'fp16', [1, 2, 3], [4, 5]).key)"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {PassageKVKey.of("m", "fp16", [1, 2, 3], [4, 5]).key}


@pytest.mark.parametrize(
    "other",
    [
        PassageKVKey.of("m2", "fp16", [1, 2, 3], [4, 5]),
        PassageKVKey.of("m", "fp32", [1, 2, 3], [4, 5]),
        PassageKVKey.of("m", "int8", [1, 2, 3], [4, 5]),
        PassageKVKey.of("m", "fp16", [1, 2, 4], [4, 5]),
        PassageKVKey.of("m", "fp16", [1, 2], [4, 5]),
        PassageKVKey.of("m", "fp16", [1, 2, 3, 4], [5]),  # same concatenation, other split
        PassageKVKey.of("m", "fp16", [1, 2, 3], [4, 6]),
        PassageKVKey.of("m", "fp16", [1, 2, 3], [5, 4]),
        PassageKVKey.of("m", "fp16", [1, 2, 3], [4, 5, 0]),
        PassageKVKey("m", "fp16", (1, 2, 3), (4, 5), layout=LAYOUT_VERSION + 1),
    ],
    ids=[
        "model",
        "codec-fp32",
        "codec-int8",
        "prefix-id",
        "prefix-shorter",
        "split",
        "passage-id",
        "passage-order",
        "passage-longer",
        "layout",
    ],
)
def test_key_changes_with_every_input(other: PassageKVKey) -> None:
    base = PassageKVKey.of("m", "fp16", [1, 2, 3], [4, 5])
    assert other.digest != base.digest
    assert other.key != base.key


def test_prefix_key_differs_from_passage_keys() -> None:
    prefix = PassageKVKey.of("m", "fp16", [1, 2, 3], [])
    assert prefix.key.startswith(KEY_PREFIX + "x:")
    for passage in ([1], [1, 2, 3], [0]):
        key = PassageKVKey.of("m", "fp16", [1, 2, 3], passage)
        assert key.key.startswith(KEY_PREFIX + "p:")
        assert key.key != prefix.key and key.digest != prefix.digest


def test_manager_key_uses_generator_and_codec(tiny_generator) -> None:
    gen = tiny_generator
    a = KVCacheManager(gen, MemoryStore(), "fp32").key([5, 6])
    assert a.model == gen.fingerprint
    assert a.codec == "fp32"
    assert a.prefix_ids == tuple(gen.prefix_ids)
    assert a.passage_ids == (5, 6)
    assert KVCacheManager(gen, MemoryStore(), "fp16").key([5, 6]).key != a.key


def test_unknown_codec_is_rejected(tiny_generator) -> None:
    with pytest.raises(ValueError, match="unknown KV codec"):
        KVCacheManager(tiny_generator, MemoryStore(), "bf8")


# ------------------------------------------------------------------------------------- get and prefix


def test_first_get_computes_second_get_hits(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    expected = reference(mgr, passages)

    got, report = mgr.get(passages)
    assert (report.hits, report.misses, report.corrupt) == (0, len(passages), 0)
    assert report.bytes == 0 and report.compute_ms > 0
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)
    # prefix: computed and written once; passages: all recomputed and written
    assert mgr.counters == {
        "hits": 0,
        "misses": len(passages),
        "recomputed": len(passages) + 1,
        "corrupt": 0,
        "written": len(passages) + 1,
    }
    assert all(store.exists_many([mgr.key(p).key for p in passages]))

    got2, report2 = mgr.get(passages)
    assert (report2.hits, report2.misses, report2.corrupt) == (len(passages), 0, 0)
    assert report2.compute_ms == 0 and report2.bytes > 0
    for g, e in zip(got2, expected, strict=True):
        assert_same(g, e)
        assert g.keys.dtype == tiny_generator.dtype
    assert mgr.counters["hits"] == len(passages)
    assert mgr.counters["recomputed"] == len(passages) + 1  # nothing more
    stats = mgr.stats()
    assert stats["codec"] == "fp32" and stats["store"]["kind"] == store.kind


def test_blob_is_a_checked_fp32_copy(tiny_generator) -> None:
    store = MemoryStore()
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passage = passages_of(tiny_generator)[0]
    (kv,), _ = mgr.get([passage])
    key = mgr.key(passage)
    keys, values = decode_kv(stored(store, key.key), expect_digest=key.digest)
    assert torch.equal(keys, kv.keys) and torch.equal(values, kv.values)
    g = tiny_generator
    assert tuple(keys.shape) == (g.num_layers, g.num_kv_heads, len(passage), g.head_dim)


def test_fp16_codec_is_close(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp16")
    passages = passages_of(tiny_generator)
    expected = reference(mgr, passages)
    mgr.get(passages)
    got, report = mgr.get(passages)
    assert report.hits == len(passages)
    for g, e in zip(got, expected, strict=True):
        assert g.keys.dtype == torch.float32
        assert_close(g, e, atol=1e-2)
    # half the bytes of fp32 (plus headers)
    fp32 = KVCacheManager(tiny_generator, MemoryStore(), "fp32")
    fp32.get(passages)
    _, report32 = fp32.get(passages)
    assert report.bytes < 0.6 * report32.bytes


def test_order_is_kept_with_duplicates(tiny_generator, store: KVStore) -> None:
    a, b, c, d = passages_of(tiny_generator)
    request = [c, a, c, d, a, b, c]

    # from the store: exact, in order
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    expected = {tuple(p): kv for p, kv in zip((a, b, c, d), reference(mgr, [a, b, c, d]), strict=True)}
    mgr.get([a, b, c, d])
    got, report = mgr.get(request)
    assert len(got) == len(request)
    assert (report.hits, report.misses) == (len(request), 0)
    for p, kv in zip(request, got, strict=True):
        assert_same(kv, expected[tuple(p)])
    assert got[0].keys.data_ptr() != got[2].keys.data_ptr()  # separate tensors, not aliases

    # a first request with duplicates: every slot is computed and comes back in order
    fresh = KVCacheManager(tiny_generator, MemoryStore(), "fp32")
    got, report = fresh.get(request)
    assert len(got) == len(request)
    assert report.hits == 0 and report.misses == len(request)
    for p, kv in zip(request, got, strict=True):
        assert kv.tokens == len(p)
        assert_close(kv, expected[tuple(p)], atol=1e-5)
    assert fresh.store.stats()["entries"] == 4 + 1  # one blob per distinct passage, and the prefix


def test_empty_request(tiny_generator) -> None:
    mgr = KVCacheManager(tiny_generator, MemoryStore(), "fp32")
    got, report = mgr.get([])
    assert got == [] and (report.hits, report.misses) == (0, 0)


def test_prefix_is_stored_once_and_reused(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    prefix = mgr.prefix()
    assert prefix is mgr.prefix()
    assert_same(prefix, tiny_generator.encode_prefix())
    assert prefix.tokens == len(tiny_generator.prefix_ids)
    assert mgr.counters["recomputed"] == 1 and mgr.counters["written"] == 1
    puts = store.stats()["puts"]
    mgr.get(passages_of(tiny_generator)[:1])
    mgr.prefix()
    assert mgr.counters["recomputed"] == 2  # the passage only
    assert store.stats()["puts"] == puts + 1

    # a second process (manager) over the same store loads the prefix instead of computing it
    again = KVCacheManager(tiny_generator, store, "fp32")
    assert_same(again.prefix(), prefix)
    assert again.counters["recomputed"] == 0 and again.counters["written"] == 0


def test_corrupt_prefix_is_recomputed(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    good = mgr.prefix()
    key = mgr.key(()).key
    overwrite(store, key, b"garbage")
    fresh = KVCacheManager(tiny_generator, store, "fp32")
    assert_same(fresh.prefix(), good)
    assert fresh.counters["corrupt"] == 1 and fresh.counters["recomputed"] == 1
    # written back: a third manager reads it
    third = KVCacheManager(tiny_generator, store, "fp32")
    assert_same(third.prefix(), good)
    assert third.counters["recomputed"] == 0 and third.counters["corrupt"] == 0


# --------------------------------------------------------------------------------------------- ensure


def test_ensure_computes_only_what_is_missing(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    a, b, c, d = passages_of(tiny_generator)
    mgr.get([b])  # already there before indexing

    out = mgr.ensure([a, b, a, c, list(a), d, c])
    assert out["kv_present"] == 1
    assert out["kv_computed"] == 3  # a, c, d once each
    assert out["kv_bytes_written"] > 0 and out["kv_seconds"] >= 0
    assert all(store.exists_many([mgr.key(p).key for p in (a, b, c, d)]))

    again = mgr.ensure([a, b, c, d])
    assert (again["kv_present"], again["kv_computed"], again["kv_bytes_written"]) == (4, 0, 0)

    before = dict(mgr.counters)
    got, report = mgr.get([d, c, b, a])
    assert (report.hits, report.misses) == (4, 0)
    assert mgr.counters["recomputed"] == before["recomputed"]
    expected = reference(mgr, [a, b, c, d])
    for kv, e in zip(got, [expected[3], expected[2], expected[1], expected[0]], strict=True):
        assert_close(kv, e, atol=1e-5)


def test_ensure_in_chunks_and_empty(tiny_generator) -> None:
    store = MemoryStore()
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    out = mgr.ensure(passages, chunk=1)
    assert out["kv_computed"] == len(passages)
    assert store.stats()["entries"] == len(passages) + 1  # and the prefix
    assert mgr.ensure([])["kv_computed"] == 0


def test_empty_passage_never_aliases_the_prefix(tiny_generator) -> None:
    """An empty passage has no cache of its own; it must not come back as the prefix's cache."""
    from kvrag.errors import InvalidInputError

    assert tiny_generator.passage_ids("  ", None) == []  # e.g. a whitespace-only piece (WordPiece)
    mgr = KVCacheManager(tiny_generator, MemoryStore(), "fp32")
    mgr.prefix()
    try:
        kvs, _ = mgr.get([[]])
    except InvalidInputError:
        return  # refusing is fine (encode_passages refuses empty passages too)
    assert kvs[0].tokens == 0, "the empty passage got the prefix's cache"


# ------------------------------------------------------------------------------------------- corruption


def _garbage(blob: bytes) -> bytes:
    return b"\x00not a kv blob at all" * 4


def _flip_payload_byte(blob: bytes) -> bytes:
    out = bytearray(blob)
    out[-5] ^= 0x40
    return bytes(out)


def _truncate(blob: bytes) -> bytes:
    return blob[:-4]


def _header_byte(blob: bytes) -> bytes:
    out = bytearray(blob)
    out[0] ^= 0x01  # magic
    return bytes(out)


@pytest.mark.parametrize("damage", [_garbage, _flip_payload_byte, _truncate, _header_byte])
def test_corrupt_blob_is_detected_recomputed_and_rewritten(tiny_generator, store: KVStore, damage) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    expected = reference(mgr, passages)
    mgr.get(passages)
    victim = mgr.key(passages[1]).key
    overwrite(store, victim, damage(stored(store, victim)))

    got, report = mgr.get(passages)
    assert report.corrupt == 1
    assert report.misses == 0 and report.hits == len(passages) - 1
    assert mgr.counters["corrupt"] == 1
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, atol=1e-5)

    # the good blob was written back: the next get is all hits
    got, report = mgr.get(passages)
    assert (report.hits, report.misses, report.corrupt) == (len(passages), 0, 0)
    assert_close(got[1], expected[1], atol=1e-5)
    keys, _ = decode_kv(stored(store, victim), expect_digest=mgr.key(passages[1]).digest)
    assert keys.shape[2] == len(passages[1])


def test_blob_under_another_passages_key_is_rejected(tiny_generator, store: KVStore) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    # two passages of the same length, so only the digest can tell the blobs apart
    a = passages[0]
    b = list(a)
    b[-2] = b[-2] + 1 if b[-2] < 30000 else b[-2] - 1
    expected = reference(mgr, [a, b])
    mgr.get([a, b])
    key_a, key_b = mgr.key(a).key, mgr.key(b).key
    overwrite(store, key_a, stored(store, key_b))

    got, report = mgr.get([a, b])
    assert report.corrupt == 1 and report.hits == 1
    assert_close(got[0], expected[0], atol=1e-5)
    assert not torch.equal(got[0].keys, expected[1].keys)
    got, report = mgr.get([a, b])
    assert (report.hits, report.corrupt) == (2, 0)
    assert_close(got[0], expected[0], atol=1e-5)


def test_blob_with_wrong_shape_is_rejected(tiny_generator) -> None:
    """A blob whose digest matches but whose shape does not (e.g. written by a buggy writer)."""
    from kvrag.rag.kvcache import encode_kv

    store = MemoryStore()
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passage = passages_of(tiny_generator)[2]
    key = mgr.key(passage)
    (kv,) = reference(mgr, [passage])
    short = encode_kv(kv.keys[:, :, :-1], kv.values[:, :, :-1], codec="fp32", digest=key.digest)
    store.put_many({key.key: short})
    (got,), report = mgr.get([passage])
    assert report.corrupt == 1
    assert got.tokens == len(passage)
    assert_close(got, kv, atol=1e-5)


# -------------------------------------------------------------------------------- model and codec changes


def test_other_generator_misses_and_never_gets_a_wrong_cache(
    tiny_generator, other_generator, store: KVStore
) -> None:
    assert other_generator.fingerprint != tiny_generator.fingerprint
    assert other_generator.prefix_ids == tiny_generator.prefix_ids
    first = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    first.ensure(passages)

    second = KVCacheManager(other_generator, store, "fp32")
    expected = reference(second, passages)
    got, report = second.get(passages)
    assert (report.hits, report.misses, report.corrupt) == (0, len(passages), 0)
    assert second.counters["recomputed"] == len(passages) + 1  # its own prefix too
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)
    assert not torch.equal(got[0].keys, first.get(passages)[0][0].keys)


def test_changed_fingerprint_is_a_miss(tiny_generator, store: KVStore, monkeypatch) -> None:
    mgr = KVCacheManager(tiny_generator, store, "fp32")
    passages = passages_of(tiny_generator)
    mgr.ensure(passages)
    monkeypatch.setattr(tiny_generator, "fingerprint", tiny_generator.fingerprint + "-changed")
    other = KVCacheManager(tiny_generator, store, "fp32")
    _, report = other.get(passages)
    assert (report.hits, report.misses) == (0, len(passages))


@pytest.mark.parametrize(("first", "second"), [("fp32", "fp16"), ("fp16", "fp32"), ("fp16", "int8")])
def test_changed_codec_is_a_miss(tiny_generator, store: KVStore, first: str, second: str) -> None:
    passages = passages_of(tiny_generator)
    KVCacheManager(tiny_generator, store, first).ensure(passages)
    mgr = KVCacheManager(tiny_generator, store, second)
    got, report = mgr.get(passages)
    assert (report.hits, report.misses, report.corrupt) == (0, len(passages), 0)
    assert mgr.counters["recomputed"] == len(passages) + 1
    _, report = mgr.get(passages)
    assert report.hits == len(passages)
    atol = 1e-5 if second == "fp32" else (1e-2 if second == "fp16" else 1.0)
    for g, e in zip(got, reference(mgr, passages), strict=True):
        assert_close(g, e, atol=atol)


def test_changed_prompt_is_a_miss(tiny_generator, tiny_llama_dir, tmp_path) -> None:
    store = MemoryStore()
    passages = passages_of(tiny_generator)
    KVCacheManager(tiny_generator, store, "fp32").ensure(passages)
    extractive = Generator(str(tiny_llama_dir), models_dir=tmp_path / "models", prompt="extractive")
    assert extractive.prefix_ids != tiny_generator.prefix_ids
    assert extractive.fingerprint == tiny_generator.fingerprint
    mgr = KVCacheManager(extractive, store, "fp32")
    got, report = mgr.get(passages)
    assert (report.hits, report.misses) == (0, len(passages))
    assert mgr.prefix().tokens == len(extractive.prefix_ids)
    for g, e in zip(got, reference(mgr, passages), strict=True):
        assert_same(g, e)


# ---------------------------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_manager_over_redis(tiny_generator, redis_store_url: str) -> None:
    store = open_kv_store(redis_store_url)
    assert isinstance(store, RedisStore)
    try:
        mgr = KVCacheManager(tiny_generator, store, "fp32")
        passages = passages_of(tiny_generator)
        expected = reference(mgr, passages)
        got, report = mgr.get(passages)
        assert report.misses == len(passages)
        _, again = mgr.get(passages)
        assert (again.hits, again.misses) == (len(passages), 0)
        fresh = KVCacheManager(tiny_generator, open_kv_store(redis_store_url), "fp32")
        got2, report2 = fresh.get(passages)
        assert report2.hits == len(passages) and fresh.counters["recomputed"] == 0
        for g, g2, e in zip(got, got2, expected, strict=True):
            assert_same(g, e)
            assert_same(g2, e)
        assert fresh.ensure(passages)["kv_computed"] == 0
        assert store.stats()["errors"] == 0
        fresh.store.close()
    finally:
        store.close()


@pytest.mark.redis
def test_redis_going_down_degrades_to_recompute(tiny_generator, private_redis) -> None:
    store = open_kv_store(private_redis.url + "?timeout=0.3&prefix=mgr:")
    try:
        mgr = KVCacheManager(tiny_generator, store, "fp32")
        passages = passages_of(tiny_generator)
        expected = reference(mgr, passages)
        assert mgr.ensure(passages)["kv_computed"] == len(passages)
        _, report = mgr.get(passages)
        assert report.hits == len(passages)
        assert store.stats()["errors"] == 0

        private_redis.stop()
        got, report = mgr.get(passages)  # must not raise
        assert (report.hits, report.misses, report.corrupt) == (0, len(passages), 0)
        for g, e in zip(got, expected, strict=True):
            assert_same(g, e)
        stats = mgr.stats()
        assert stats["store"]["errors"] >= 1
        assert stats["store"]["available"] == 0
        # while the store is marked down, further calls answer at once as misses
        got, report = mgr.get(passages[:2])
        assert report.misses == 2
        assert_close(got[1], expected[1], atol=1e-5)
        out = mgr.ensure(passages)
        assert out["kv_computed"] == len(passages)  # nothing known to be stored: all recomputed, no raise
    finally:
        store.close()


# ------------------------------------------------------------------------------------------ get_joined


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_get_joined_equals_prefix_plus_get(tiny_generator, store: KVStore, codec: str) -> None:
    """Decoding straight into one joined cache gives exactly the prefix and `get`'s caches, in order,
    both on a cold store (recomputed) and a warm one (decoded), with a corrupt blob among them."""
    mgr = KVCacheManager(tiny_generator, store, codec)
    passages = passages_of(tiny_generator)
    request = [passages[2], passages[0], passages[2], passages[1]]
    cold, report = mgr.get_joined(request)
    assert report.hits == 0 and report.misses == 4
    mgr.key(passages[0])
    overwrite(store, mgr.key(passages[0]).key, _flip_payload_byte(stored(store, mgr.key(passages[0]).key)))
    warm, report = mgr.get_joined(request)
    assert report.corrupt == 1 and report.hits == 3
    prefix = mgr.prefix()
    caches, _ = mgr.get(request)
    for joined in (cold, warm):
        assert joined.prefix_tokens == prefix.tokens and joined.lengths == [len(p) for p in request]
        assert torch.equal(joined.kv.keys[:, :, : prefix.tokens], prefix.keys)
        pos = prefix.tokens
        for kv in caches:
            part = KV(
                joined.kv.keys[:, :, pos : pos + kv.tokens], joined.kv.values[:, :, pos : pos + kv.tokens]
            )
            # int8: a recomputed cache is exact, a decoded one carries the quantisation error
            assert_close(part, kv, atol=1e-5 if codec == "fp32" else 0.1)
            pos += kv.tokens
        assert pos == joined.kv.keys.shape[2]


def test_prefill_from_joined_equals_prefill_from_pieces(tiny_generator) -> None:
    mgr = KVCacheManager(tiny_generator, MemoryStore(64 << 20), "fp32")
    passages = passages_of(tiny_generator)
    q = tiny_generator.question_ids("where do the boats come in?")
    joined, _ = mgr.get_joined(passages)
    caches, _ = mgr.get(passages)
    for mode in ("parallel", "ape"):
        a = tiny_generator.prefill(mode, q, joined)
        b = tiny_generator.prefill(mode, q, JoinedContext.join(mgr.prefix(), caches, passages))
        assert (a.logits - b.logits).abs().max().item() <= 1e-5
        assert a.next_position == b.next_position and a.ape == b.ape
