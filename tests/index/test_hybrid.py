"""Tests for index.hybrid persistence: crash-safe BM25 generations, the earlier layouts (bm25s, in
place and per generation), torn files detected on load, and `Collection.bm25` rebuilding a stale or
unreadable index."""

from __future__ import annotations

import json
from pathlib import Path

import bm25s
import numpy as np
import pytest

from kvrag.errors import CorruptIndexError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.hybrid import BM25Index, Segment

TEXTS = [
    "The harbour is full of fishing boats.",
    "A zorblaxian lantern glows under the bridge.",
    "Barley grows in the fields by the river.",
]
IDS = [4, 9, 17]


def built(ids=IDS, texts=TEXTS) -> BM25Index:
    bm = BM25Index()
    bm.build(ids, texts)
    return bm


def top(bm: BM25Index, query: str) -> int:
    return int(bm.search([query], 1)[1][0, 0])


def bm25s_index(texts) -> bm25s.BM25:
    """A bm25s index as earlier versions built it."""
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords=None, show_progress=False), show_progress=False)
    return retriever


def write_legacy(folder: Path, ids=IDS, texts=TEXTS, count: int | None = None) -> None:
    """The layout of earlier versions: bm25s/, bm25_ids.npy and bm25.json, written in place."""
    folder.mkdir(parents=True, exist_ok=True)
    bm25s_index(texts).save(str(folder / "bm25s"), show_progress=False)
    np.save(folder / "bm25_ids.npy", np.asarray(ids, dtype=np.int64))
    (folder / "bm25.json").write_text(
        json.dumps({"language": None, "count": len(ids) if count is None else count})
    )


def test_save_writes_a_new_generation_and_removes_the_old(tmp_path):
    folder = tmp_path / "bm25"
    built().save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.1"]
    bm = BM25Index.load(folder)
    assert bm.generation == 1 and bm.ids.tolist() == IDS
    assert top(bm, "zorblaxian") == 9
    built([1, 2], TEXTS[:2]).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.2"]
    assert BM25Index.load(folder).ids.tolist() == [1, 2]
    assert BM25Index.saved_ids(folder).tolist() == [1, 2]


def test_an_empty_index_round_trips(tmp_path):
    folder = tmp_path / "bm25"
    built([], []).save(folder)
    bm = BM25Index.load(folder)
    assert bm.ids.tolist() == [] and bm.search(["anything"], 3)[1].tolist() == [[-1, -1, -1]]


def test_a_save_killed_half_way_leaves_the_previous_generation(tmp_path):
    """What a kill leaves at each point of a save: a temporary folder being written, or the renamed
    generation folder before bm25.json names it. Neither is read; the next save clears both."""
    folder = tmp_path / "bm25"
    built().save(folder)
    torn = folder / ".gen.2.x1y2.tmp"
    (torn / "bm25s").mkdir(parents=True)
    (torn / "bm25s" / "params.index.json").write_text("{")
    built([1], TEXTS[:1]).save(tmp_path / "other")
    (tmp_path / "other" / "gen.1").rename(folder / "gen.2")  # renamed, never committed
    assert BM25Index.load(folder).ids.tolist() == IDS
    assert BM25Index.saved_ids(folder).tolist() == IDS
    built([5, 6], TEXTS[1:]).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.2"]
    bm = BM25Index.load(folder)
    assert bm.ids.tolist() == [5, 6] and top(bm, "zorblaxian") == 5


def test_a_failing_save_keeps_the_previous_generation(tmp_path, monkeypatch):
    folder = tmp_path / "bm25"
    built().save(folder)

    def fail(self, folder):
        (Path(folder) / "segment.npz").write_bytes(b"PK")
        raise OSError("disk full")

    monkeypatch.setattr(Segment, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        built([1], TEXTS[:1]).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.1"]
    assert BM25Index.load(folder).ids.tolist() == IDS


def test_the_earlier_layout_loads_and_is_replaced_on_save(tmp_path):
    folder = tmp_path / "bm25"
    write_legacy(folder)
    bm = BM25Index.load(folder)
    assert bm.ids.tolist() == IDS and top(bm, "zorblaxian") == 9
    assert BM25Index.saved_ids(folder).tolist() == IDS
    bm.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bm25.json", "gen.1"]
    assert BM25Index.load(folder).ids.tolist() == IDS


@pytest.mark.parametrize("tear", ["count", "corpus", "ids", "meta", "files"])
def test_torn_files_are_reported_as_corrupt(tmp_path, tear):
    """A kill in the middle of an in-place save (the earlier layout) mixes files of two builds."""
    folder = tmp_path / "bm25"
    write_legacy(folder)
    if tear == "count":  # bm25.json of another build
        (folder / "bm25.json").write_text(json.dumps({"language": None, "count": 2}))
    elif tear == "corpus":  # bm25s of another build, over fewer passages
        bm25s_index(TEXTS[:2]).save(str(folder / "bm25s"), show_progress=False)
    elif tear == "ids":
        (folder / "bm25_ids.npy").write_bytes((folder / "bm25_ids.npy").read_bytes()[:20])
    elif tear == "meta":
        (folder / "bm25.json").write_text('{"language": nu')
    else:
        (folder / "bm25s" / "indptr.csc.index.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CorruptIndexError):
        BM25Index.load(folder)
    if tear != "corpus" and tear != "files":  # the cheap check reads only bm25.json and the ids
        assert BM25Index.saved_ids(folder) is None


# -- Collection.bm25 ----------------------------------------------------------------------------


@pytest.fixture
def coll(tmp_path):
    c = Collection.create(tmp_path, "c", CollectionConfig(encoder="unused"))
    for i, text in enumerate(TEXTS):
        store(c, f"d{i}", text)
    c.rebuild_bm25()
    yield c
    c.close()


def store(c: Collection, doc_id: str, text: str) -> list[int]:
    return c.store.replace_document(
        {"id": doc_id, "title": None, "content_hash": doc_id},
        [{"text": text, "start": 0, "end": len(text), "kind": "text", "content_hash": doc_id}],
    )[1]


def reopen(c: Collection) -> Collection:
    c.close()
    return Collection.open(c.folder.parent.parent, c.name)


def test_a_stale_saved_bm25_is_rebuilt_on_load(coll):
    """A writer killed after committing passages (and saving vectors) but before the BM25 rebuild."""
    new = store(coll, "late", "Copper violins hum in the orchard.")
    c = reopen(coll)
    try:
        assert c.bm25.ids.tolist() == c.store.passage_ids()
        assert top(c.bm25, "violins") == new[0]
        assert BM25Index.saved_ids(c.folder / "bm25").tolist() == c.store.passage_ids()  # and saved
    finally:
        c.close()


def test_an_unreadable_saved_bm25_is_rebuilt_on_load(coll):
    folder = coll.folder / "bm25"
    gen = json.loads((folder / "bm25.json").read_text())["segments"][0]["folder"]
    (folder / gen / "segment.npz").write_bytes(b"PK\x03\x04 torn")
    c = reopen(coll)
    try:
        assert c.bm25.ids.tolist() == c.store.passage_ids()
        assert top(c.bm25, "zorblaxian") == c.store.passage_ids()[1]
    finally:
        c.close()


def test_a_rebuild_is_not_saved_while_another_writer_holds_the_collection(coll):
    store(coll, "late", "Copper violins hum in the orchard.")
    c = reopen(coll)
    other = Collection.open(c.folder.parent.parent, c.name)
    try:
        saved = BM25Index.saved_ids(c.folder / "bm25").tolist()
        with other.writing():
            assert c.bm25.ids.tolist() == c.store.passage_ids()  # served from memory
            assert BM25Index.saved_ids(c.folder / "bm25").tolist() == saved
    finally:
        other.close()
        c.close()


def test_the_writer_lock_is_reentrant_and_exclusive(coll):
    other = Collection.open(coll.folder.parent.parent, coll.name)
    try:
        with coll.writing() as held:
            assert held
            with coll.writing() as again:  # a commit inside a job
                assert again
            with other.writing(blocking=False) as theirs:
                assert not theirs
        with other.writing(blocking=False) as theirs:
            assert theirs
    finally:
        other.close()
