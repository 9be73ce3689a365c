"""Incremental BM25 (index.hybrid) and its use by `Collection.commit`: updates rank and score as a
full rebuild over the same passages does (bm25s's scores on a fresh build), segments merge, a save
writes only the new segments, stemming keeps working, indexes of the bm25s layout load and are
rebuilt on the first change, and commit applies the store's delta without a rebuild."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import bm25s
import numpy as np
import pytest

from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.hybrid import BM25Index, Merging, Segment

WORDS = [f"w{i}" for i in range(300)]


def corpus(n: int, seed: int) -> list[str]:
    """Texts of 3 to 30 Zipf-distributed words (common words in many passages, rare ones in few)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ranks = np.minimum(rng.zipf(1.3, int(rng.integers(3, 31))), len(WORDS)) - 1
        out.append(" ".join(WORDS[r] for r in ranks))
    return out


QUERIES = ["w0", "w1 w2", "w5 w5 w40", "w3 w77 w150", "w120", "w299 w0 w7", "nothing here"]


def rebuilt(bm: BM25Index, text_of: dict[int, str]) -> BM25Index:
    """A fresh index over the live passages of `bm`, in the same order."""
    fresh = BM25Index(bm.language)
    fresh.build(bm.ids.tolist(), [text_of[i] for i in bm.ids.tolist()])
    return fresh


def assert_same_results(a: BM25Index, b: BM25Index, queries=QUERIES, k: int = 20) -> None:
    sa, ia = a.search(queries, k)
    sb, ib = b.search(queries, k)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)


def test_a_fresh_build_scores_as_bm25s_does():
    texts = corpus(200, 1)
    bm = BM25Index()
    bm.build(list(range(100, 300)), texts)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    for q in QUERIES[:-1]:
        scores = retriever.get_scores(
            bm25s.tokenize([q], stopwords=None, return_ids=False, show_progress=False)[0]
        )
        s, i = bm.search([q], 200)
        hit = i[0] >= 0
        np.testing.assert_array_equal(s[0][hit], scores[i[0][hit] - 100].astype(np.float32))
        assert hit.sum() == (scores > 0).sum()
        assert (np.diff(s[0][hit]) <= 0).all()


def test_updates_rank_and_score_as_a_rebuild_over_the_same_passages():
    texts = corpus(400, 2)
    text_of = dict(enumerate(texts))
    bm = BM25Index()
    bm.merging = Merging(fraction=0.1, min_docs=30)
    bm.build(list(range(300)), texts[:300])
    rng = np.random.default_rng(3)
    next_id, full_merges = 300, 0
    for step in range(25):
        removed = rng.choice(bm.ids, 3, replace=False).tolist() + [10_000]  # an unknown id is ignored
        added = list(range(next_id, next_id + 4))
        next_id += 4
        before = bm.segments
        bm.update(added, [text_of[i] for i in added], removed)
        full_merges += bm.segments == 1 and before > 1
        assert not set(removed) & set(bm.ids.tolist())
        assert bm.count == len(bm.ids) == 300 + step + 1
        assert bm.segments <= 8
        if step % 6 == 0:
            assert_same_results(bm, rebuilt(bm, text_of))
    assert_same_results(bm, rebuilt(bm, text_of))
    assert full_merges >= 1, "the tail never outgrew the first segment"
    bm.update([], [], bm.ids[:5].tolist())  # deletions alone
    assert_same_results(bm, rebuilt(bm, text_of))
    bm.compact()
    assert bm.segments == 1
    assert_same_results(bm, rebuilt(bm, text_of))


def test_update_refuses_live_ids_and_re_adds_removed_ones():
    bm = BM25Index()
    bm.build([1, 2], ["alpha beta", "gamma"])
    with pytest.raises(InvalidInputError):
        bm.update([2], ["delta"], [])
    with pytest.raises(InvalidInputError):
        bm.update([3, 3], ["x", "y"], [])
    assert bm.ids.tolist() == [1, 2]
    bm.update([2], ["delta"], [2])  # replace passage 2
    assert bm.ids.tolist() == [1, 2]
    assert bm.search(["gamma"], 3)[1][0].tolist() == [-1, -1, -1]
    assert bm.search(["delta"], 3)[1][0].tolist() == [2, -1, -1]


def test_saves_write_only_new_segments_and_load_back_the_same(tmp_path):
    folder = tmp_path / "bm25"
    texts = corpus(120, 4)
    text_of = dict(enumerate(texts))
    bm = BM25Index()
    bm.build(list(range(100)), texts[:100])
    bm.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.1"]
    base = (folder / "gen.1" / "segment.npz").stat().st_ino
    for gen, start in ((2, 100), (3, 105), (4, 110)):
        bm.update(list(range(start, start + 5)), texts[start : start + 5], [start - 100])
        bm.save(folder)
        meta = json.loads((folder / "bm25.json").read_text())
        assert meta["generation"] == gen and meta["segments"][0]["folder"] == "gen.1"
        assert (folder / "gen.1" / "segment.npz").stat().st_ino == base, "the first segment is not rewritten"
        assert {p.name for p in folder.iterdir()} == {"bm25.json", *(s["folder"] for s in meta["segments"])}
        loaded = BM25Index.load(folder)
        assert loaded.ids.tolist() == bm.ids.tolist()
        assert BM25Index.saved_ids(folder).tolist() == bm.ids.tolist()
        assert_same_results(loaded, bm)
        assert_same_results(loaded, rebuilt(loaded, text_of))
    # an index saved into another folder writes all its segments there
    bm.save(tmp_path / "copy")
    assert BM25Index.load(tmp_path / "copy").ids.tolist() == bm.ids.tolist()


def test_a_failed_segment_write_keeps_the_previous_generation(tmp_path, monkeypatch):
    folder = tmp_path / "bm25"
    bm = BM25Index()
    bm.build([1, 2, 3], ["red apple", "green pear", "blue plum"])
    bm.save(folder)
    bm.update([4], ["yellow apple"], [1])

    def fail(self, where):
        (Path(where) / "segment.npz").write_bytes(b"PK")
        raise OSError("disk full")

    monkeypatch.setattr(Segment, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        bm.save(folder)
    assert BM25Index.load(folder).ids.tolist() == [1, 2, 3]
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.1"]
    monkeypatch.undo()
    bm.save(folder)
    assert BM25Index.load(folder).ids.tolist() == [2, 3, 4]
    assert BM25Index.load(folder).search(["apple"], 2)[1][0].tolist() == [4, -1]


def test_stemming_by_language_survives_updates(tmp_path):
    pytest.importorskip("Stemmer")
    bm = BM25Index("english")
    bm.build([1, 2], ["The horses were running in the field", "A quiet library"])
    bm.update([3], ["Connections between the stations"], [])
    assert bm.search(["runs"], 1)[1][0, 0] == 1
    assert bm.search(["connected"], 1)[1][0, 0] == 3
    assert bm.search(["the"], 1)[1][0, 0] == -1  # a stop word
    bm.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.language == "english" and loaded.search(["connecting"], 1)[1][0, 0] == 3


def write_bm25s_generation(folder: Path, ids: list[int], texts: list[str]) -> None:
    """The layout the previous version saved: gen.1/bm25s and gen.1/ids.npy behind bm25.json."""
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    (folder / "gen.1").mkdir(parents=True)
    retriever.save(str(folder / "gen.1" / "bm25s"), show_progress=False)
    np.save(folder / "gen.1" / "ids.npy", np.asarray(ids, dtype=np.int64))
    meta = {"format_version": 2, "language": None, "count": len(ids), "generation": 1, "folder": "gen.1"}
    (folder / "bm25.json").write_text(json.dumps(meta))


def test_the_bm25s_generation_layout_loads_searches_and_cannot_be_updated(tmp_path):
    folder = tmp_path / "bm25"
    texts = corpus(50, 5)
    write_bm25s_generation(folder, list(range(50)), texts)
    old = BM25Index.load(folder)
    assert not old.incremental and old.ids.tolist() == list(range(50))
    assert BM25Index.saved_ids(folder).tolist() == list(range(50))
    fresh = BM25Index()
    fresh.build(list(range(50)), texts)
    for q in QUERIES:
        (s_old, i_old), (s_new, i_new) = old.search([q], 5), fresh.search([q], 5)
        np.testing.assert_allclose(s_old, s_new, rtol=1e-6)
        assert set(i_old[0][s_old[0] > s_old[0][4]]) == set(i_new[0][s_new[0] > s_new[0][4]])  # ties aside
    with pytest.raises(InvalidInputError):
        old.update([99], ["w1"], [])


# -- Collection.commit ---------------------------------------------------------------------------


def store(c: Collection, doc_id: str, texts: list[str]) -> tuple[list[int], list[int]]:
    return c.store.replace_document(
        {"id": doc_id, "title": None, "content_hash": doc_id + str(texts)},
        [{"text": t, "start": 0, "end": len(t), "kind": "text", "content_hash": t} for t in texts],
    )


@pytest.fixture
def coll(tmp_path):
    c = Collection.create(tmp_path, "c", CollectionConfig(encoder="unused"))
    for i, text in enumerate(corpus(60, 6)):
        store(c, f"d{i}", [text])
    c.rebuild_bm25()
    yield c
    c.close()


def no_rebuild(monkeypatch) -> None:
    def refuse(self, *, save: bool = True):
        raise AssertionError("BM25 was rebuilt")

    monkeypatch.setattr(Collection, "rebuild_bm25", refuse)


def texts_of(c: Collection) -> dict[int, str]:
    ids = c.store.passage_ids()
    return dict(zip(*c.store.texts(ids), strict=True))


def reopen(c: Collection) -> Collection:
    c.close()
    return Collection.open(c.folder.parent.parent, c.name)


def test_commit_applies_the_store_delta_without_a_rebuild(coll, monkeypatch):
    no_rebuild(monkeypatch)
    for round_ in range(3):
        store(coll, f"d{round_}", [f"replaced zorblax{round_} text", "second passage"])  # replace
        store(coll, f"new{round_}", [f"fresh quokka{round_} words"])  # add
        coll.store.delete_documents([f"d{10 + round_}"])  # delete: no vector index saw it (no hint)
        coll.bm25_dirty = True
        coll.commit()
        assert not coll.bm25_dirty
        stored = coll.store.passage_ids()
        assert sorted(coll.bm25.ids.tolist()) == stored
        assert sorted(BM25Index.saved_ids(coll.folder / "bm25").tolist()) == stored
        assert (
            coll.bm25.search([f"zorblax{round_}"], 1)[1][0, 0]
            == coll.store.get_document(f"d{round_}")["passages"][0]
        )
    assert_same_results(coll.bm25, rebuilt(coll.bm25, texts_of(coll)))
    # a fresh Collection object (nothing in memory) updates the saved index
    c = reopen(coll)
    try:
        store(c, "late", ["violins in the orchard"])
        c.bm25_dirty = True
        c.commit()
        assert sorted(BM25Index.saved_ids(c.folder / "bm25").tolist()) == c.store.passage_ids()
        assert c.bm25.search(["violins"], 1)[1][0, 0] == c.store.get_document("late")["passages"][0]
        assert_same_results(c.bm25, rebuilt(c.bm25, texts_of(c)))
    finally:
        c.close()


def test_commit_rebuilds_a_bm25_of_the_bm25s_layout_into_segments(coll):
    folder = coll.folder / "bm25"
    ids, texts = coll.store.texts(coll.store.passage_ids())
    for p in folder.iterdir():
        if p.is_dir():
            for f in sorted(p.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            p.rmdir()
    write_bm25s_generation(folder, ids, texts)
    c = reopen(coll)
    try:
        assert not c.bm25.incremental  # loads and serves searches as it is
        store(c, "late", ["violins in the orchard"])
        c.bm25_dirty = True
        c.commit()
        meta = json.loads((folder / "bm25.json").read_text())
        assert meta["format_version"] == 3 and c.bm25.incremental
        assert sorted(c.bm25.ids.tolist()) == c.store.passage_ids()
    finally:
        c.close()


def test_a_full_rebuild_can_be_forced(coll, monkeypatch):
    coll.bm25_incremental = False
    store(coll, "late", ["violins in the orchard"])
    coll.bm25_dirty = True
    calls = []
    real = Collection.rebuild_bm25
    monkeypatch.setattr(Collection, "rebuild_bm25", lambda self, **kw: calls.append(1) or real(self, **kw))
    coll.commit()
    assert calls == [1] and sorted(coll.bm25.ids.tolist()) == coll.store.passage_ids()


class HashEncoder:
    """A stand-in encoder: a deterministic random unit vector per text; tokens are words."""

    max_tokens, fingerprint = 4096, "hash"

    def __init__(self, dim: int = 32):
        self.name, self.dim = f"test/hash-{dim}", dim

    def encode(self, texts, *, kind="passage", dim=None, show_progress=False) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
        out = np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def count_tokens(self, texts) -> list[int]:
        return [len(t.split()) for t in texts]


def test_upserts_through_the_job_rewrite_neither_index(tmp_path, monkeypatch):
    from kvrag.index.job import Document, index_documents, is_consistent, recover

    enc = HashEncoder()
    c = Collection.create(tmp_path, "c", CollectionConfig(encoder=enc.name, max_tokens=512, overlap_tokens=0))
    index_documents(c, [Document(f"d{i}", t, lang="en") for i, t in enumerate(corpus(300, 7))], enc)
    vectors = c.folder / "vectors"
    faiss_before = {p.name: p.stat().st_ino for p in vectors.glob("index.*.faiss")}
    bm25_first = json.loads((c.folder / "bm25" / "bm25.json").read_text())["segments"][0]["folder"]
    no_rebuild(monkeypatch)
    for i in range(3):
        index_documents(c, [Document(f"d{i}", f"replaced quokka{i} text", lang="en")], enc)
        index_documents(c, [Document(f"n{i}", f"brand new wombat{i} passage", lang="en")], enc)
    assert {p.name: p.stat().st_ino for p in vectors.glob("index.*.faiss")} == faiss_before
    meta = json.loads((c.folder / "bm25" / "bm25.json").read_text())
    assert meta["segments"][0]["folder"] == bm25_first and len(meta["segments"]) > 1
    c = reopen(c)
    try:
        assert is_consistent(c)
        report = recover(c, enc)
        assert not any(report.values()), report
        for word, doc in (("quokka1", "d1"), ("wombat2", "n2")):
            hits = c.search(word, enc, k=3, hybrid=True)  # BM25's only hit: first or second by RRF
            assert doc in [h.doc_id for h in hits[:2]]
        assert sorted(c.index.row_ids[c.index.row_ids >= 0].tolist()) == c.store.passage_ids()
    finally:
        c.close()
