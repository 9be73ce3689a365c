"""Tests for index.store.PassageStore (SQLite only: no models)."""

from __future__ import annotations

import sqlite3

import pytest

from kvrag.errors import InvalidInputError
from kvrag.index.store import PassageRow, PassageStore


@pytest.fixture
def store(tmp_path):
    s = PassageStore(tmp_path / "passages.sqlite")
    yield s
    s.close()


def passage(
    text: str,
    *,
    start: int = 0,
    kind: str = "text",
    lang: str | None = "en",
    title: str | None = None,
    metadata: dict | None = None,
) -> dict:
    return {
        "text": text,
        "start": start,
        "end": start + len(text),
        "kind": kind,
        "lang": lang,
        "title": title,
        "metadata": metadata or {},
        "content_hash": f"h-{text}",
    }


def doc(
    doc_id: str,
    *,
    source: str | None = None,
    title: str | None = None,
    content_hash: str = "dh",
    metadata: dict | None = None,
) -> dict:
    return {
        "id": doc_id,
        "source": source if source is not None else f"/src/{doc_id}",
        "title": title,
        "content_hash": content_hash,
        "metadata": metadata or {},
    }


@pytest.fixture
def filled(store):
    """Three documents with passages in two languages, code and metadata at both levels."""
    store.replace_document(
        doc("a", title="Alpha", metadata={"team": "red", "year": 2020}),
        [passage("one", lang="en", metadata={"team": "blue"}), passage("zwei", start=4, lang="de")],
    )  # ids 1, 2
    store.replace_document(
        doc("b", title="Beta", metadata={"team": "green", "year": 2021}),
        [passage("def f(): pass", kind="code", lang="python", title="def f")],
    )  # id 3
    store.replace_document(
        doc("c", title="Gamma", metadata={"team": "red", "draft": True}),
        [passage("drei", lang="de"), passage("four", start=5, lang="en", metadata={"score": 1.5})],
    )  # ids 4, 5
    return store


# -- schema ------------------------------------------------------------------------------------


def test_schema_is_created(store):
    tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"collections", "documents", "passages"} <= tables
    indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"passages_doc", "documents_source"} <= indexes
    cols = [r[1] for r in store.db.execute("PRAGMA table_info(passages)")]
    assert cols == [
        "id",
        "doc_id",
        "ord",
        "text",
        "start",
        "end",
        "lang",
        "kind",
        "title",
        "metadata",
        "content_hash",
        "compressed",
    ]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.counts() == {"documents": 0, "passages": 0}
    assert store.collection_config() is None


def test_reopen_keeps_data_and_collection_record(tmp_path):
    s = PassageStore(tmp_path / "p.sqlite")
    s.set_collection("c", {"encoder": "x", "max_tokens": 64})
    s.replace_document(doc("a"), [passage("hello")])
    s.close()
    s2 = PassageStore(tmp_path / "p.sqlite")  # CREATE ... IF NOT EXISTS must not wipe anything
    try:
        assert s2.collection_config() == {"encoder": "x", "max_tokens": 64}
        assert s2.counts() == {"documents": 1, "passages": 1}
        assert s2.passages([1])[0].text == "hello"
    finally:
        s2.close()


def test_kind_is_constrained(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.replace_document(doc("a"), [passage("x", kind="prose")])


# -- replace / ids -----------------------------------------------------------------------------


def test_replace_document_returns_removed_and_new_ids(store):
    removed, added = store.replace_document(doc("a"), [passage("p1"), passage("p2", start=3)])
    assert (removed, added) == ([], [1, 2])
    removed, added = store.replace_document(doc("b"), [passage("q1")])
    assert (removed, added) == ([], [3])
    removed, added = store.replace_document(
        doc("a", content_hash="new"), [passage("p1b"), passage("p2b"), passage("p3b")]
    )
    assert sorted(removed) == [1, 2]
    assert added == [4, 5, 6]
    got = store.get_document("a")
    assert got["content_hash"] == "new"
    assert got["passages"] == [4, 5, 6]
    assert [r.ord for r in store.passages([4, 5, 6])] == [0, 1, 2]
    assert store.passage_ids() == [3, 4, 5, 6]
    assert store.counts() == {"documents": 2, "passages": 4}


def test_ids_are_never_reused_after_deletes(store):
    store.replace_document(doc("a"), [passage("a1"), passage("a2")])  # 1, 2
    store.replace_document(doc("b"), [passage("b1"), passage("b2")])  # 3, 4
    assert store.delete_documents(["b"]) == [3, 4]  # the highest ids are gone
    _, added = store.replace_document(doc("c"), [passage("c1")])
    assert added == [5]  # without AUTOINCREMENT SQLite would hand out 3 again
    removed, added = store.replace_document(doc("c"), [])
    assert (removed, added) == ([5], [])
    _, added = store.replace_document(doc("d"), [passage("d1")])
    assert added == [6]
    assert store.passage_ids() == [1, 2, 6]


def test_passage_id_array_equals_passage_ids(store):
    assert store.passage_id_array().tolist() == [] and store.passage_id_array().dtype == "int64"
    for i in range(12):
        store.replace_document(doc(f"d{i}"), [passage(f"{i}-{k}") for k in range(i % 3)])
    store.delete_documents(["d4", "d8"])
    assert store.passage_id_array().tolist() == store.passage_ids()


def test_replace_with_no_passages_keeps_document(store):
    store.replace_document(doc("a"), [passage("x")])
    removed, added = store.replace_document(doc("a", content_hash="empty"), [])
    assert (removed, added) == ([1], [])
    got = store.get_document("a")
    assert got["passages"] == [] and got["content_hash"] == "empty"


def test_get_document(store):
    store.replace_document(
        doc("a", source="/s/a.md", title="T", content_hash="abc", metadata={"k": "ü"}),
        [passage("x"), passage("y", start=2)],
    )
    got = store.get_document("a")
    assert got["id"] == "a"
    assert got["source"] == "/s/a.md"
    assert got["title"] == "T"
    assert got["content_hash"] == "abc"
    assert got["metadata"] == {"k": "ü"}
    assert got["passages"] == [1, 2]
    assert got["updated_at"].endswith("Z")
    assert store.get_document("nope") is None


# -- reading passages ---------------------------------------------------------------------------


def test_passages_keep_requested_order_and_join_document(filled):
    rows = filled.passages([5, 1, 3, 999, 2])
    assert [r.id for r in rows] == [5, 1, 3, 2]  # unknown ids skipped, order kept
    assert all(isinstance(r, PassageRow) for r in rows)
    r5, r1, r3, r2 = rows
    assert (r5.doc_id, r5.doc_title, r5.source, r5.text, r5.ord) == ("c", "Gamma", "/src/c", "four", 1)
    assert (r5.start, r5.end) == (5, 9)
    assert r5.metadata == {"score": 1.5}
    assert (r1.doc_id, r1.doc_title, r1.lang, r1.metadata) == ("a", "Alpha", "en", {"team": "blue"})
    assert (r3.kind, r3.lang, r3.title, r3.doc_title) == ("code", "python", "def f", "Beta")
    assert (r2.text, r2.lang, r2.title) == ("zwei", "de", None)
    assert filled.passages([]) == []


def test_passages_order_across_query_chunks(store):
    # more than 500 ids forces several IN (...) queries
    store.replace_document(doc("big", title="Big"), [passage(f"p{i}") for i in range(1203)])
    wanted = list(range(1203, 0, -2))
    rows = store.passages(wanted)
    assert [r.id for r in rows] == wanted
    assert rows[0].text == "p1202" and rows[-1].text == "p0"
    assert {r.doc_title for r in rows} == {"Big"}


def test_iter_texts_batches_in_id_order(filled):
    batches = list(filled.iter_texts(batch=2))
    assert [ids for ids, _ in batches] == [[1, 2], [3, 4], [5]]
    assert [t for _, texts in batches for t in texts] == ["one", "zwei", "def f(): pass", "drei", "four"]


# -- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"lang": "de"}, [2, 4]),
        ({"lang": ["de", "python"]}, [2, 3, 4]),
        ({"kind": "code"}, [3]),
        ({"kind": "text"}, [1, 2, 4, 5]),
        ({"doc_id": "c"}, [4, 5]),
        ({"doc_id": ["a", "b"]}, [1, 2, 3]),
        ({"source": "/src/b"}, [3]),
        ({"title": "Gamma"}, [4, 5]),  # the document title
        ({"lang": "de", "doc_id": "a"}, [2]),  # keys are ANDed
        ({"lang": "xx"}, []),
        # metadata: the passage's own value wins over its document's
        ({"team": "blue"}, [1]),
        ({"team": "red"}, [2, 4, 5]),  # passage 1 overrides its document's "red"
        ({"team": ["green", "blue"]}, [1, 3]),
        ({"year": 2020}, [1, 2]),
        ({"year": [2020, 2021]}, [1, 2, 3]),
        ({"year": "2020"}, []),  # a string is not the number
        ({"score": 1.5}, [5]),
        ({"draft": True}, [4, 5]),
        ({"team": "red", "lang": "en"}, [5]),
        ({"missing_key": "x"}, []),
    ],
)
def test_filter_ids(filled, flt, expected):
    assert sorted(filled.filter_ids(flt)) == expected


@pytest.mark.parametrize(
    "flt",
    [
        {"a'); DROP": 1},
        {'a"]': 1},
        {"": "x"},
        {".hidden": 1},
        {"x" * 65: 1},
        {},
        {"lang": {"x": 1}},
        {"lang": []},
        {"lang": None},
        {"lang": ["de", None]},
        {"lang": [["de"]]},
        {"team": {"$ne": "red"}},
    ],
)
def test_filter_ids_rejects_bad_keys_and_values(filled, flt):
    with pytest.raises(InvalidInputError):
        filled.filter_ids(flt)


@pytest.mark.parametrize("flt", [None, [], ["lang"], "lang=de"])
def test_filter_ids_rejects_non_objects(filled, flt):
    with pytest.raises(InvalidInputError):
        filled.filter_ids(flt)


def test_rejected_filter_leaves_tables_alone(filled):
    with pytest.raises(InvalidInputError):
        filled.filter_ids({"x'); DROP TABLE passages; --": 1})
    assert filled.counts() == {"documents": 3, "passages": 5}


def test_dotted_and_dashed_metadata_keys(store):
    store.replace_document(doc("a", metadata={"a.b": 1, "x-y": "z"}), [passage("t")])
    assert store.filter_ids({"a.b": 1}) == [1]  # a literal key, not a JSON path into {"a": {"b": ...}}
    assert store.filter_ids({"x-y": "z"}) == [1]


# -- delete / hashes / transactions ---------------------------------------------------------------


def test_delete_documents_cascades_to_passages(filled):
    removed = filled.delete_documents(["a", "c", "never-there"])
    assert sorted(removed) == [1, 2, 4, 5]
    assert filled.passage_ids() == [3]
    assert filled.db.execute("SELECT COUNT(*) FROM passages WHERE doc_id IN ('a', 'c')").fetchone()[0] == 0
    assert filled.get_document("a") is None
    assert filled.counts() == {"documents": 1, "passages": 1}
    assert filled.delete_documents([]) == []


def test_deleting_a_document_row_directly_cascades(filled):
    filled.db.execute("DELETE FROM documents WHERE id='b'")  # the foreign key itself, not delete_documents
    assert filled.passage_ids() == [1, 2, 4, 5]


def test_document_hashes_with_source_prefix(store):
    for src, h in [("/data/docs/a.md", "ha"), ("/data/docs/sub/b.md", "hb"), ("/data/other/c.md", "hc")]:
        store.replace_document(doc(src, source=src, content_hash=h), [])
    store.replace_document({"id": "nosrc", "content_hash": "hn"}, [])
    assert store.document_hashes() == {
        "/data/docs/a.md": "ha",
        "/data/docs/sub/b.md": "hb",
        "/data/other/c.md": "hc",
        "nosrc": "hn",
    }
    assert store.document_hashes("/data/docs/") == {"/data/docs/a.md": "ha", "/data/docs/sub/b.md": "hb"}
    assert store.document_hashes("/data/other/c.md") == {"/data/other/c.md": "hc"}
    assert store.document_hashes("/nowhere/") == {}


def test_document_hashes_prefix_wildcards_are_literal(store):
    sources = [
        "/d/a_b/1.md",
        "/d/aXb/2.md",
        "/d/100%/3.md",
        "/d/100abc/4.md",
        "/d/back\\slash/5.md",
        "/d/backXslash/6.md",
    ]
    for src in sources:
        store.replace_document(doc(src, source=src, content_hash=src[-4]), [])
    assert set(store.document_hashes("/d/a_b/")) == {"/d/a_b/1.md"}
    assert set(store.document_hashes("/d/100%")) == {"/d/100%/3.md"}
    assert set(store.document_hashes("/d/back\\")) == {"/d/back\\slash/5.md"}
    assert set(store.document_hashes("/d/a")) == {"/d/a_b/1.md", "/d/aXb/2.md"}


def test_document_hashes_prefix_is_case_sensitive(store):
    store.replace_document(doc("/data/Docs/a.md", source="/data/Docs/a.md"), [])
    store.replace_document(doc("/data/docs/b.md", source="/data/docs/b.md"), [])
    assert set(store.document_hashes("/data/Docs/")) == {"/data/Docs/a.md"}


def test_failing_replace_rolls_back(store):
    store.replace_document(doc("a", content_hash="v1", title="old"), [passage("keep me")])
    bad = [passage("fine"), passage("bad kind", kind="prose")]
    with pytest.raises(sqlite3.IntegrityError):
        store.replace_document(doc("a", content_hash="v2", title="new"), bad)
    got = store.get_document("a")
    assert got["content_hash"] == "v1" and got["title"] == "old"
    assert got["passages"] == [1]
    assert store.passages([1])[0].text == "keep me"
    assert store.counts() == {"documents": 1, "passages": 1}
    with pytest.raises(KeyError):  # a passage without text: fails half-way through the inserts
        store.replace_document(
            doc("b"), [passage("ok"), {"start": 0, "end": 1, "kind": "text", "content_hash": "x"}]
        )
    assert store.get_document("b") is None
    assert store.counts() == {"documents": 1, "passages": 1}
    assert not store.db.in_transaction
    _, added = store.replace_document(doc("c"), [passage("after")])  # the store is still usable
    assert len(added) == 1 and added[0] > 1


def test_transaction_context_rolls_back_on_error(store):
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as db:
        db.execute("INSERT INTO documents VALUES ('x', NULL, NULL, 'h', '{}', 'now')")
        raise RuntimeError("boom")
    assert store.get_document("x") is None
    assert not store.db.in_transaction
    with store.transaction() as db:
        db.execute("INSERT INTO documents VALUES ('y', NULL, NULL, 'h', '{}', 'now')")
    assert store.get_document("y") is not None


def test_delete_documents_rolls_back_as_a_whole(filled):
    filled.db.execute(
        "CREATE TRIGGER no_c BEFORE DELETE ON documents WHEN OLD.id = 'c' "
        "BEGIN SELECT RAISE(ABORT, 'protected'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="protected"):
        filled.delete_documents(["a", "c"])
    assert filled.get_document("a") is not None  # 'a' was deleted first, then rolled back
    assert filled.counts() == {"documents": 3, "passages": 5}
