"""Tests for index.job: reading sources, idempotent re-runs, replace, prune and repair (tiny random encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.hybrid import BM25Index
from kvrag.index.job import Document, index_documents, index_paths, read_jsonl, recover, repair
from kvrag.index.vector import VectorIndex

EN = (
    "# Weather report\n\nThe weather in the north is cold and wet in the winter. The people of the town like to "
    "stay inside by the fire and read.\n\nIt is a quiet place for most of the year, and the roads to the coast "
    "are long and empty.\n\nIn the spring the farmers plant barley in the fields, and the children walk to the "
    "school by the river. When the summer comes, the whole town goes to the lake for a week of rest.\n"
)
DE = (
    "# Brot und Butter\n\nDas Brot ist frisch und die Butter ist weich. Der Bäcker backt jeden Morgen für die Leute "
    "im Dorf.\n\nEr ist nicht müde, und die Arbeit macht ihm Freude.\n"
)
FR = "# Le chat\n\nLe chat est sur la table et il dort dans la cuisine. Les enfants jouent dans le jardin pour la journée.\n"
PY = (
    'import os\n\n\ndef foo(x):\n    """Add one."""\n    return x + 1\n\n\n'
    "class Bar:\n    def baz(self):\n        return os.sep\n"
)
JS = "function hello(name) {\n  return 'hi ' + name;\n}\n"
JSONL_RECORDS = [
    {
        "_id": "j1",
        "title": "Engines",
        "text": "The engine hums quietly in the basement all night long.",
        "author": "ann",
        "year": 2021,
    },
    {
        "_id": "j2",
        "text": "The cat sleeps on the warm windowsill in the afternoon sun.",
        "lang": "de",
        "metadata": {"source_db": "pets"},
        "tags": ["a", "b"],
    },
    {"id": 7, "title": "Numbers", "text": "Seven is a prime number and so is eleven."},
]


def write_sources(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "en.md").write_text(EN, encoding="utf-8")
    (src / "de.md").write_text(DE, encoding="utf-8")
    (src / "sub" / "fr.md").write_text(FR, encoding="utf-8")
    (src / "mod.py").write_text(PY, encoding="utf-8")
    (src / "app.js").write_text(JS, encoding="utf-8")
    (src / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL_RECORDS), encoding="utf-8")
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    (src / ".hidden.md").write_text("# Hidden\n\nThis must not be indexed at all.\n", encoding="utf-8")
    return src


N_DOCS = 8  # en, de, fr, mod.py, app.js and three JSONL records


@pytest.fixture
def coll(tmp_path, tiny_encoder):
    c = Collection.create(
        tmp_path, "c", CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
    )
    yield c
    c.close()


@pytest.fixture
def src(tmp_path):
    return write_sources(tmp_path)


def live_ids(c: Collection) -> list[int]:
    return sorted(c.index.row_ids[c.index.row_ids >= 0].tolist())


def rows_of(c: Collection, doc_id: str):
    return c.store.passages(c.store.get_document(doc_id)["passages"])


def test_first_run_adds_everything(coll, src, tiny_encoder):
    report = index_paths(coll, [src], tiny_encoder)
    assert report.collection == "c"
    assert report.documents_seen == N_DOCS
    assert report.added == N_DOCS
    assert (report.replaced, report.unchanged, report.pruned, report.repaired) == (0, 0, 0, 0)
    assert report.skipped_files == [f"{src.resolve() / 'blob.bin'} (unsupported type)"]
    assert report.documents == N_DOCS
    assert report.passages == len(coll.store.passage_ids()) >= N_DOCS
    assert report.passages_added == report.passages
    assert report.passages_removed == 0
    assert report.seconds >= 0
    assert live_ids(coll) == coll.store.passage_ids()
    assert coll.index.ntotal == report.passages
    assert coll.index.dim == tiny_encoder.dim == 32
    root = src.resolve()
    doc_ids = set(coll.store.document_hashes())
    assert doc_ids == {str(root / n) for n in ("en.md", "de.md", "sub/fr.md", "mod.py", "app.js")} | {
        "j1",
        "j2",
        "7",
    }
    # the committed index and BM25 are on disk
    assert (coll.folder / "vectors" / "manifest.json").exists()
    assert (coll.folder / "bm25" / "bm25.json").exists()


def test_markdown_documents_titles_langs_and_offsets(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    root = src.resolve()
    for name, title, lang, text in [
        ("en.md", "Weather report", "en", EN),
        ("de.md", "Brot und Butter", "de", DE),
        ("sub/fr.md", "Le chat", "fr", FR),
    ]:
        d = coll.store.get_document(str(root / name))
        assert d["title"] == title
        assert d["source"] == str(root / name)
        rows = coll.store.passages(d["passages"])
        assert rows and {r.kind for r in rows} == {"text"}
        assert {r.lang for r in rows} == {lang}
        for r in rows:
            assert r.text == text[r.start : r.end]
            assert r.doc_title == title
    en_rows = rows_of(coll, str(root / "en.md"))
    assert len(en_rows) >= 2  # max_tokens=64 splits the English document
    assert sorted(coll.store.filter_ids({"lang": "de"})) == sorted(
        r.id for r in rows_of(coll, str(root / "de.md")) + rows_of(coll, "j2")
    )


def test_code_files(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    root = src.resolve()
    py = coll.store.get_document(str(root / "mod.py"))
    assert py["title"] == "mod"
    rows = coll.store.passages(py["passages"])
    assert [r.title for r in rows] == ["module", "def foo", "class Bar"]
    assert {r.kind for r in rows} == {"code"}
    assert {r.lang for r in rows} == {"python"}
    foo = rows[1]
    assert foo.text == PY[foo.start : foo.end]
    assert foo.text.startswith("def foo(x):") and foo.text.endswith("return x + 1")
    js = rows_of(coll, str(root / "app.js"))
    assert len(js) == 1
    assert (js[0].kind, js[0].lang, js[0].title, js[0].doc_title) == ("code", "javascript", None, "app")
    assert js[0].text == JS.strip()
    assert sorted(coll.store.filter_ids({"kind": "code"})) == sorted(r.id for r in rows + js)
    assert sorted(coll.store.filter_ids({"lang": "python"})) == sorted(r.id for r in rows)


def test_jsonl_records(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    jsonl = str(src.resolve() / "data.jsonl")
    j1 = coll.store.get_document("j1")
    assert (j1["title"], j1["source"]) == ("Engines", jsonl)
    assert j1["metadata"] == {"author": "ann", "year": 2021}
    j2 = coll.store.get_document("j2")
    assert j2["title"] is None
    assert j2["metadata"] == {"source_db": "pets", "tags": ["a", "b"]}  # `lang` is not metadata
    assert {r.lang for r in rows_of(coll, "j2")} == {"de"}  # the stated language wins over the English text
    assert {r.lang for r in rows_of(coll, "j1")} == {"en"}  # guessed
    seven = coll.store.get_document("7")  # `id` works as well as `_id`; numbers become strings
    assert seven["title"] == "Numbers"
    assert rows_of(coll, "7")[0].text == JSONL_RECORDS[2]["text"]
    # document metadata is filterable
    assert coll.store.filter_ids({"author": "ann"}) == [r.id for r in rows_of(coll, "j1")]
    assert coll.store.filter_ids({"source_db": "pets"}) == [r.id for r in rows_of(coll, "j2")]
    assert coll.store.filter_ids({"year": 2021}) == [r.id for r in rows_of(coll, "j1")]


def test_second_identical_run_changes_nothing(coll, src, tiny_encoder):
    first = index_paths(coll, [src], tiny_encoder)
    ids = coll.store.passage_ids()
    hashes = coll.store.document_hashes()
    second = index_paths(coll, [src], tiny_encoder)
    assert second.documents_seen == N_DOCS
    assert second.unchanged == N_DOCS
    assert (second.added, second.replaced, second.pruned, second.repaired) == (0, 0, 0, 0)
    assert (second.passages_added, second.passages_removed) == (0, 0)
    assert (second.documents, second.passages) == (first.documents, first.passages)
    assert coll.store.passage_ids() == ids
    assert coll.store.document_hashes() == hashes
    assert live_ids(coll) == ids
    assert len(coll.index.row_ids) == len(ids)  # nothing re-added, not even as deleted rows


def test_editing_one_file_replaces_only_that_document(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    root = src.resolve()
    en_id = str(root / "en.md")
    old_en = coll.store.get_document(en_id)["passages"]
    others = sorted(set(coll.store.passage_ids()) - set(old_en))
    (src / "en.md").write_text(
        "# Weather report\n\nToday it is sunny and warm on the coast.\n", encoding="utf-8"
    )
    report = index_paths(coll, [src], tiny_encoder)
    assert (report.added, report.replaced, report.unchanged, report.pruned) == (0, 1, N_DOCS - 1, 0)
    assert report.passages_removed == len(old_en)
    new_en = coll.store.get_document(en_id)["passages"]
    assert report.passages_added == len(new_en) == 1
    assert min(new_en) > max(others + old_en)  # fresh ids
    live = set(live_ids(coll))
    assert not live & set(old_en)  # old vectors are gone from the index
    assert live == set(others) | set(new_en)
    assert rows_of(coll, en_id)[0].text == "# Weather report\n\nToday it is sunny and warm on the coast."
    assert sorted(set(coll.store.passage_ids()) - set(new_en)) == others


def test_prune_removes_deleted_files(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    de_id = str(src.resolve() / "de.md")
    de_passages = coll.store.get_document(de_id)["passages"]
    (src / "de.md").unlink()

    kept = index_paths(coll, [src], tiny_encoder)  # without prune the document stays
    assert (kept.pruned, kept.unchanged, kept.documents_seen) == (0, N_DOCS - 1, N_DOCS - 1)
    assert coll.store.get_document(de_id) is not None
    assert set(de_passages) <= set(live_ids(coll))

    pruned = index_paths(coll, [src], tiny_encoder, prune=True)
    assert pruned.pruned == 1
    assert pruned.passages_removed == len(de_passages)
    assert pruned.documents == N_DOCS - 1
    assert coll.store.get_document(de_id) is None
    assert not set(de_passages) & set(live_ids(coll))
    assert live_ids(coll) == coll.store.passage_ids()


def test_prune_removes_records_dropped_from_jsonl(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    j2 = coll.store.get_document("j2")["passages"]
    (src / "data.jsonl").write_text(json.dumps(JSONL_RECORDS[0]) + "\n", encoding="utf-8")
    report = index_paths(coll, [src / "data.jsonl"], tiny_encoder, prune=True)
    assert (report.documents_seen, report.unchanged, report.pruned) == (1, 1, 2)
    assert coll.store.get_document("j2") is None and coll.store.get_document("7") is None
    assert coll.store.get_document("j1") is not None
    assert coll.store.get_document(str(src.resolve() / "en.md")) is not None  # other sources are untouched
    assert not set(j2) & set(live_ids(coll))


def test_prune_of_one_folder_keeps_other_folders(coll, tmp_path, tiny_encoder):
    a, b = tmp_path / "a", tmp_path / "ab"  # "ab" shares the prefix "a" but not "a/"
    a.mkdir()
    b.mkdir()
    (a / "x.md").write_text("The first folder holds this note about apples.\n")
    (b / "y.md").write_text("The second folder holds this note about pears.\n")
    index_paths(coll, [a, b], tiny_encoder)
    (a / "x.md").unlink()
    (a / "z.md").write_text("A new note about plums is here now.\n")
    report = index_paths(coll, [a], tiny_encoder, prune=True)
    assert (report.added, report.pruned) == (1, 1)
    assert set(coll.store.document_hashes()) == {str(a.resolve() / "z.md"), str(b.resolve() / "y.md")}


def test_prune_of_one_file_keeps_files_sharing_its_name_prefix(coll, tmp_path, tiny_encoder):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.md").write_text("Notes about apples and their trees.\n")
    (d / "a.md.txt").write_text("A plain text copy that is a separate file.\n")
    index_paths(coll, [d], tiny_encoder)
    report = index_paths(coll, [d / "a.md"], tiny_encoder, prune=True)
    assert report.pruned == 0
    assert coll.store.get_document(str(d.resolve() / "a.md.txt")) is not None


def test_emptied_file_loses_its_passages(coll, tmp_path, tiny_encoder):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.md").write_text("Some content that will later be removed.\n")
    index_paths(coll, [d], tiny_encoder)
    (d / "a.md").write_text("   \n")
    index_paths(coll, [d], tiny_encoder, prune=True)
    assert coll.store.passage_ids() == []


def test_empty_document_is_skipped(coll, tmp_path, tiny_encoder):
    d = tmp_path / "d"
    d.mkdir()
    (d / "empty.md").write_text("  \n\n")
    (d / "full.md").write_text("Some words in a file.\n")
    report = index_paths(coll, [d], tiny_encoder)
    assert report.skipped_files == [f"{d.resolve() / 'empty.md'} (empty)"]
    assert (report.added, report.documents) == (1, 1)


def test_non_utf8_file_is_skipped(coll, tmp_path, tiny_encoder):
    d = tmp_path / "d"
    d.mkdir()
    (d / "latin1.txt").write_bytes("Grüße aus Köln".encode("latin-1"))
    (d / "ok.txt").write_text("Fine text here.\n")
    report = index_paths(coll, [d], tiny_encoder)
    assert report.skipped_files == [f"{d.resolve() / 'latin1.txt'} (not UTF-8)"]
    assert report.added == 1


def test_duplicate_jsonl_ids_are_rejected(coll, tmp_path, tiny_encoder):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"_id": "x", "text": "first text"}\n{"_id": "x", "text": "second text"}\n')
    with pytest.raises(InvalidInputError, match="'x' appears twice"):
        index_paths(coll, [f], tiny_encoder)


def test_duplicate_ids_across_jsonl_files_are_rejected(coll, tmp_path, tiny_encoder):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text('{"_id": "same", "text": "from a"}\n')
    (d / "b.jsonl").write_text('{"_id": "same", "text": "from b"}\n')
    with pytest.raises(InvalidInputError, match="appears twice"):
        index_paths(coll, [d], tiny_encoder)


@pytest.mark.parametrize(
    ("lines", "line_no", "message"),
    [
        (['{"_id": "a", "text": "ok"}', '{"_id": "b", "text": '], 2, "not valid JSON"),
        (['{"_id": "a", "text": "ok"}', "", "[1, 2]"], 3, "expected a JSON object"),
        (['{"text": "no id"}'], 1, "needs an id"),
        (['{"_id": "a", "text": 5}'], 1, "string `text`"),
        (['{"_id": "a", "text": "x", "metadata": [1]}'], 1, "`metadata` must be an object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(coll, tmp_path, tiny_encoder, lines, line_no, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError, match=message) as err:
        index_paths(coll, [f], tiny_encoder)
    assert f"{f.resolve()}:{line_no}:" in str(err.value)


def test_read_jsonl_fields(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(
        json.dumps(
            {"_id": "a", "text": "t", "title": "", "language": "fr", "metadata": {"m": 1}, "extra": True}
        )
        + "\n\n"
    )
    (d,) = list(read_jsonl(f))
    assert d == Document(
        "a", "t", title=None, source=str(f), kind="text", lang="fr", metadata={"m": 1, "extra": True}
    )


def test_read_jsonl_accepts_zero_id(tmp_path):
    f = tmp_path / "z.jsonl"
    f.write_text('{"_id": 0, "text": "zero"}\n')
    assert [d.id for d in read_jsonl(f)] == ["0"]


def test_missing_path_is_rejected(coll, tmp_path, tiny_encoder):
    with pytest.raises(InvalidInputError, match="no such file or folder"):
        index_paths(coll, [tmp_path / "does-not-exist"], tiny_encoder)
    assert coll.store.counts() == {"documents": 0, "passages": 0}


def test_single_file_path(coll, src, tiny_encoder):
    report = index_paths(coll, [src / "mod.py"], tiny_encoder)
    assert (report.documents_seen, report.added, report.skipped_files) == (1, 1, [])
    assert set(coll.store.document_hashes()) == {str(src.resolve() / "mod.py")}


def test_repair_makes_index_match_store(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    index = coll.index
    # crash 1: passages committed to SQLite, never embedded
    _, added = coll.store.replace_document(
        {"id": "crashed", "source": None, "title": "Crash", "content_hash": "h"},
        [
            {
                "text": "Passage stored but never indexed.",
                "start": 0,
                "end": 33,
                "kind": "text",
                "lang": "en",
                "content_hash": "p1",
            },
            {
                "text": "Another one.",
                "start": 34,
                "end": 46,
                "kind": "text",
                "lang": "en",
                "content_hash": "p2",
            },
        ],
    )
    # crash 2: a vector whose passage is gone
    orphan = max(added) + 100
    index.add(np.array([orphan], dtype=np.int64), np.ones((1, index.dim), dtype=np.float32))
    assert orphan in live_ids(coll) and not set(added) & set(live_ids(coll))

    assert repair(coll, tiny_encoder) == 1 + len(added)
    assert live_ids(coll) == coll.store.passage_ids()
    assert coll.bm25_dirty
    assert repair(coll, tiny_encoder) == 0  # idempotent
    # the repaired vector is the same embedding the job would have produced
    expected = tiny_encoder.encode(["Crash Passage stored but never indexed."], kind="passage")
    scores, ids = index.search(expected, 1)
    assert ids[0, 0] == added[0]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    coll.commit()
    reopened = Collection.open(coll.folder.parent.parent, "c")
    try:
        assert (
            sorted(reopened.index.row_ids[reopened.index.row_ids >= 0].tolist())
            == reopened.store.passage_ids()
        )
    finally:
        reopened.close()


def test_next_run_repairs_a_crash(coll, src, tiny_encoder):
    index_paths(coll, [src], tiny_encoder)
    coll.store.replace_document(
        {"id": "crashed", "title": None, "content_hash": "h"},
        [{"text": "orphan passage text", "start": 0, "end": 19, "kind": "text", "content_hash": "x"}],
    )
    report = index_paths(coll, [src], tiny_encoder)
    assert report.repaired == 1
    assert report.unchanged == N_DOCS
    assert live_ids(coll) == coll.store.passage_ids()


def test_commit_and_reload(coll, src, tiny_encoder, tmp_path):
    index_paths(coll, [src], tiny_encoder)
    rows_before = len(coll.index.row_ids)
    (src / "en.md").write_text("# Short\n\nNow only one sentence.\n")
    index_paths(coll, [src], tiny_encoder)  # leaves deleted rows in the index
    coll.commit()
    live = live_ids(coll)
    assert len(live) == coll.index.ntotal == coll.store.counts()["passages"]
    assert len(coll.index.row_ids) > rows_before  # replaced rows are marked deleted, not compacted
    reopened = Collection.open(tmp_path, "c")
    try:
        assert reopened.config == coll.config
        assert reopened.config.max_tokens == 64 and reopened.config.overlap_tokens == 8
        assert reopened.index.ntotal == coll.index.ntotal
        loaded = VectorIndex.load(tmp_path / "collections" / "c" / "vectors")
        assert loaded.ntotal == coll.index.ntotal
        assert sorted(loaded.row_ids[loaded.row_ids >= 0].tolist()) == live
        assert reopened.store.counts() == coll.store.counts()
    finally:
        reopened.close()


def test_index_documents_directly(coll, tiny_encoder):
    docs = [
        Document("d1", "Hello there, this is the first document.", title="One"),
        Document("d2", "def f():\n    return 1\n", kind="python", lang="python"),
    ]
    report = index_documents(coll, iter(docs), tiny_encoder)
    assert (report.added, report.documents) == (2, 2)
    assert rows_of(coll, "d2")[0].title == "def f"
    # a changed chunking configuration changes every content hash
    assert docs[0].content_hash("64/8") != docs[0].content_hash("256/32")
    again = index_documents(coll, iter(docs), tiny_encoder)
    assert again.unchanged == 2


@pytest.mark.parametrize("method", ["pca", "learned"])
def test_truncated_collection_with_an_adaptor_indexes_full_embeddings(tmp_path, tiny_encoder, method):
    """A collection with an adaptor and --dim: the job encodes at full dimension, the index adapts and
    truncates, queries get the same transform, and all of it survives a reopen and a repair."""
    docs = [
        Document(id=f"d{i}", text=t) for i, t in enumerate([EN, DE, FR, *(r["text"] for r in JSONL_RECORDS)])
    ]
    config = CollectionConfig(encoder=tiny_encoder.name, dim=16, adaptor=method)
    coll = Collection.create(tmp_path, "adapted", config)
    index_documents(coll, docs, tiny_encoder)
    index = coll.index
    assert index.dim == 16 and index.input_dim == tiny_encoder.dim and index.adaptor is not None
    queries = ["cold weather in the north", "Brot und Butter", "the engine hums"]
    before = [[(h.passage_id, round(h.score, 5)) for h in coll.search(q, tiny_encoder, k=3)] for q in queries]
    # The collection encodes the query at full dimension and the index adapts it.
    q = tiny_encoder.encode([queries[0]], kind="query", dim=index.input_dim)
    scores, ids = index.search(q, 3)
    assert [int(i) for i in ids[0]] == [pid for pid, _ in before[0]]
    coll.close()
    again = Collection.open(tmp_path, "adapted")
    after = [[(h.passage_id, round(h.score, 5)) for h in again.search(q, tiny_encoder, k=3)] for q in queries]
    assert after == before
    assert repair(again, tiny_encoder) == 0
    again.close()


@pytest.mark.parametrize(
    ("spec", "adaptor", "expect"), [("Flat", "pca", True), ("BFlat", "none", True), ("Flat", "none", False)]
)
def test_first_batch_calibrates_on_pseudo_queries_of_its_passages(
    tmp_path, tiny_encoder, monkeypatch, spec, adaptor, expect
):
    """The batch that calibrates a new index brings pseudo-queries (titles, else first sentences)
    embedded as queries; later batches and indexes that need no calibration bring none."""
    from kvrag.index.vector import VectorIndex

    calls = []
    real_add = VectorIndex.add

    def spy(self, ids, vectors, *, fit_queries=None):
        calls.append((self.fitted, None if fit_queries is None else np.asarray(fit_queries).shape))
        return real_add(self, ids, vectors, fit_queries=fit_queries)

    monkeypatch.setattr(VectorIndex, "add", spy)
    encoded: list[tuple[str, tuple[str, ...]]] = []
    real_encode = tiny_encoder.encode

    def spy_encode(texts, *, kind="passage", dim=None, show_progress=False):
        encoded.append((kind, tuple(texts)))
        return real_encode(texts, kind=kind, dim=dim, show_progress=show_progress)

    monkeypatch.setattr(tiny_encoder, "encode", spy_encode)
    docs = [
        Document(id="a", text="Cats purr softly. They nap all day.", title="On cats"),
        Document(id="b", text="Tea is brewed. Milk is optional."),
    ]
    coll = Collection.create(
        tmp_path, "pq", CollectionConfig(encoder=tiny_encoder.name, spec=spec, adaptor=adaptor)
    )
    index_documents(coll, docs, tiny_encoder)
    index_documents(coll, [Document(id="c", text="A third one. Later.", title="Third")], tiny_encoder)
    first_fitted, shape = calls[0]
    assert not first_fitted or not expect
    assert (shape == (2, tiny_encoder.dim)) if expect else shape is None
    assert all(s is None for _, s in calls[1:])
    queries = [t for kind, t in encoded if kind == "query"]
    assert queries == ([("On cats", "Tea is brewed.")] if expect else [])
    coll.close()


def test_a_code_collection_calibrates_on_its_passages_alone(tmp_path, tiny_encoder, monkeypatch):
    from kvrag.index.vector import VectorIndex

    calls = []
    real_add = VectorIndex.add

    def spy(self, ids, vectors, *, fit_queries=None):
        calls.append(fit_queries)
        return real_add(self, ids, vectors, fit_queries=fit_queries)

    monkeypatch.setattr(VectorIndex, "add", spy)
    docs = [
        Document(id=f"f{i}", text=f'def f{i}(x):\n    """Add {i} to x."""\n    return x + {i}\n', kind="code")
        for i in range(3)
    ] + [Document(id="t", text="Tea is brewed. Milk is optional.", title="Tea")]
    coll = Collection.create(
        tmp_path, "code", CollectionConfig(encoder=tiny_encoder.name, spec="Flat", adaptor="pca")
    )
    index_documents(coll, docs, tiny_encoder)
    assert len(calls) == 1 and calls[0] is None
    assert coll.index.fitted
    coll.close()


def test_count_file_kinds_and_the_default_encoder_of_a_new_collection(tmp_path):
    from kvrag.index.job import count_file_kinds
    from kvrag.service.cli import _default_index_encoder
    from kvrag.service.settings import Settings

    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "a.py").write_text(PY, encoding="utf-8")
    (code / "b.js").write_text(JS, encoding="utf-8")
    (code / ".hidden.md").write_text(EN, encoding="utf-8")  # hidden: not read, not counted
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.py").write_text(PY, encoding="utf-8")
    (mixed / "notes.md").write_text(EN, encoding="utf-8")
    assert count_file_kinds([code]) == {"code": 2, "text": 0, "jsonl": 0}
    assert count_file_kinds([mixed, code / "b.js"]) == {"code": 2, "text": 1, "jsonl": 0}
    settings = Settings(home=tmp_path / "home", encoder="text-enc", code_encoder="code-enc")
    assert _default_index_encoder(settings, "src", [str(code)]) == "code-enc"
    # A bundled code encoder that is not available here (untrained adapter) falls back to text.
    missing = Settings(home=tmp_path / "home", encoder="text-enc", code_encoder="bundled:no-such-model")
    assert _default_index_encoder(missing, "src", [str(code)]) == "text-enc"
    assert _default_index_encoder(settings, "src", [str(mixed)]) == "text-enc"
    # The default code encoder is the text encoder itself: nothing to switch.
    same = Settings(home=tmp_path / "home", encoder="text-enc", code_encoder="text-enc")
    assert _default_index_encoder(same, "src", [str(code)]) == "text-enc"
    # An existing collection keeps its own encoder: the default is not switched for it.
    Collection.create(settings.root, "src", CollectionConfig(encoder="text-enc")).close()
    assert _default_index_encoder(settings, "src", [str(code)]) == "text-enc"


# -- recover -------------------------------------------------------------------------------------


class NoEncoder:
    """An encoder that must not be called: recover on a consistent collection embeds nothing."""

    def __init__(self, like):
        self.name, self.dim, self.max_tokens = like.name, like.dim, like.max_tokens

    def encode(self, *args, **kwargs):
        raise AssertionError("the encoder was called")


def snapshot(folder: Path) -> dict[str, int]:
    """Every file and folder under `folder` with its mtime (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}


def crash_after_store(coll: Collection, doc_id: str, text: str) -> list[int]:
    """What a writer killed right after committing one document to SQLite leaves: its passages
    stored, the saved indexes as they were."""
    _, added = coll.store.replace_document(
        {"id": doc_id, "source": None, "title": None, "content_hash": doc_id},
        [{"text": text, "start": 0, "end": len(text), "kind": "text", "lang": "en", "content_hash": doc_id}],
    )
    return added


def test_recover_on_a_consistent_collection_does_nothing(coll, src, tiny_encoder, tmp_path):
    index_paths(coll, [src], tiny_encoder)
    coll.close()
    before = snapshot(coll.folder)
    reopened = Collection.open(tmp_path, "c")
    try:
        report = recover(reopened, NoEncoder(tiny_encoder))
        assert report == {"vectors_added": 0, "vectors_removed": 0, "bm25_rebuilt": False, "skipped": False}
        assert reopened._index is None and reopened._bm25 is None  # checked from the id maps alone
    finally:
        reopened.close()
    after = snapshot(coll.folder)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # only SQLite's own files (and so the folder) may change, as any open and close does
    assert changed <= {".", "passages.sqlite-shm", "passages.sqlite-wal"}, changed


def test_recover_on_an_empty_collection_does_nothing(tmp_path, tiny_encoder):
    c = Collection.create(tmp_path, "empty", CollectionConfig(encoder=tiny_encoder.name))
    try:
        assert not any(recover(c, NoEncoder(tiny_encoder)).values())
        assert not (c.folder / "vectors").exists() and not (c.folder / "bm25").exists()
    finally:
        c.close()


def test_recover_embeds_passages_a_killed_job_stored(coll, src, tiny_encoder, tmp_path):
    index_paths(coll, [src], tiny_encoder)
    added = crash_after_store(coll, "late", "A zorblaxian lantern glows under the bridge.")
    gone = coll.store.delete_documents(["j1"])  # deleted, but its vectors were never saved away
    coll.close()
    reopened = Collection.open(tmp_path, "c")
    try:
        report = recover(reopened, tiny_encoder)
        assert report == {
            "vectors_added": len(added),
            "vectors_removed": len(gone),
            "bm25_rebuilt": True,
            "skipped": False,
        }
        stored = reopened.store.passage_ids()
        assert live_ids(reopened) == stored
        assert sorted(VectorIndex.saved_ids(reopened.folder / "vectors").tolist()) == stored  # committed
        assert sorted(reopened.bm25.ids.tolist()) == stored
        hits = reopened.search("zorblaxian", tiny_encoder, k=3, hybrid=True)
        assert hits[0].doc_id == "late"
        assert not any(recover(reopened, NoEncoder(tiny_encoder)).values())  # idempotent
    finally:
        reopened.close()


def test_recover_rebuilds_a_stale_bm25(coll, src, tiny_encoder, tmp_path):
    """A kill after the vector save and before the BM25 rebuild: vectors current, BM25 behind."""
    index_paths(coll, [src], tiny_encoder)
    added = crash_after_store(coll, "late", "A zorblaxian lantern glows under the bridge.")
    coll.index.add(np.array(added), tiny_encoder.encode(["A zorblaxian lantern glows under the bridge."]))
    coll.index.save(coll.folder / "vectors")
    coll.close()
    vectors_before = snapshot(coll.folder / "vectors")
    reopened = Collection.open(tmp_path, "c")
    try:
        report = recover(reopened, NoEncoder(tiny_encoder))
        assert report == {"vectors_added": 0, "vectors_removed": 0, "bm25_rebuilt": True, "skipped": False}
        assert snapshot(coll.folder / "vectors") == vectors_before  # only BM25 was written
        stored = reopened.store.passage_ids()
        assert sorted(reopened.bm25.ids.tolist()) == stored
        assert sorted(BM25Index.load(reopened.folder / "bm25").ids.tolist()) == stored
        assert reopened.search("zorblaxian", tiny_encoder, k=3, hybrid=True)[0].doc_id == "late"
    finally:
        reopened.close()


def test_recover_stands_back_while_another_writer_holds_the_collection(coll, src, tiny_encoder, tmp_path):
    index_paths(coll, [src], tiny_encoder)
    crash_after_store(coll, "late", "Stored while a job is still running.")
    other = Collection.open(tmp_path, "c")
    try:
        with coll.writing():  # a running job
            before = snapshot(coll.folder)
            assert recover(other, tiny_encoder)["skipped"] is True
            assert snapshot(coll.folder) == before
        report = recover(other, tiny_encoder)  # the writer is gone (as after kill -9: the lock goes with it)
        assert (report["vectors_added"], report["skipped"]) == (1, False)
    finally:
        other.close()


def test_recover_calibrates_a_new_index_as_the_job_would(tmp_path, tiny_encoder, monkeypatch):
    """A first run killed before any save leaves no index: the one recover builds is calibrated on
    pseudo-queries of its first passages, as the job's first batch would have been."""
    calls = []
    real_add = VectorIndex.add

    def spy(self, ids, vectors, *, fit_queries=None):
        calls.append(None if fit_queries is None else np.asarray(fit_queries).shape)
        return real_add(self, ids, vectors, fit_queries=fit_queries)

    monkeypatch.setattr(VectorIndex, "add", spy)
    c = Collection.create(tmp_path, "b", CollectionConfig(encoder=tiny_encoder.name, spec="BFlat"))
    try:
        crash_after_store(c, "a", "Cats purr softly. They nap all day.")
        assert c.index is None
        assert recover(c, tiny_encoder)["vectors_added"] == 1
        assert calls[0] == (1, tiny_encoder.dim)
        assert (c.folder / "vectors" / "manifest.json").exists()
    finally:
        c.close()
