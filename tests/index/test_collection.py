"""Tests for index.collection: lifecycle, dense/hybrid search, filters and errors (tiny random encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrag.errors import CollectionNotFoundError, InvalidInputError
from kvrag.index.collection import MAX_QUERY_CHARS, Collection, CollectionConfig, Hit
from kvrag.index.job import index_paths

DOCS = {
    "en.md": (
        "# Harbour\n\nThe old harbour is full of small fishing boats in the morning. The fishermen sell their "
        "catch at the market by the church.\n\nIn the evening the boats come back and the gulls follow them "
        "along the coast. It is a busy place for the whole summer and the tourists love it.\n\n"
        "In the winter the harbour is quiet, and the wind from the sea is cold and strong.\n"
    ),
    "de.md": (
        "# Der Wald\n\nDer Wald ist im Herbst sehr schön und die Blätter sind rot und gelb. Die Kinder sammeln "
        "Pilze mit ihrem Großvater.\n\nAm Abend gehen sie nach Hause und essen eine warme Suppe mit Brot.\n"
    ),
    "fr.md": (
        "# La montagne\n\nLa montagne est couverte de neige en hiver et les skieurs arrivent de la ville. "
        "Le refuge est petit mais il est chaud pour la nuit.\n"
    ),
    "tool.py": (
        'def parse_config(path):\n    """Read a config file."""\n    with open(path) as fh:\n'
        "        return fh.read()\n\n\ndef main():\n    print(parse_config('x.toml'))\n"
    ),
}
RARE = "A zorblaxian lantern glows under the bridge when the tide is low."


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder):
    """One indexed collection shared by the read-only search tests."""
    home = tmp_path_factory.mktemp("home")
    src = home / "src"
    src.mkdir()
    for name, text in DOCS.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "notes.jsonl").write_text(
        json.dumps({"_id": "rare", "title": "Night", "text": RARE, "lang": "en"}) + "\n"
    )
    c = Collection.create(
        home, "c", CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
    )
    index_paths(c, [src], tiny_encoder)
    yield home, src.resolve(), c
    c.close()


@pytest.fixture
def coll(built):
    return built[2]


def all_rows(c: Collection):
    return c.store.passages(c.store.passage_ids())


# -- search ------------------------------------------------------------------------------------


def test_hits_carry_citations_with_exact_offsets(built, tiny_encoder):
    home, src, c = built
    hits = c.search("boats in the harbour", tiny_encoder, k=50)
    assert len(hits) == len(c.store.passage_ids())  # k above the corpus size returns every passage once
    assert len({h.passage_id for h in hits}) == len(hits)
    assert all(isinstance(h, Hit) for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        if h.doc_id == "rare":
            assert (h.title, h.source) == ("Night", str(src / "notes.jsonl"))
            assert h.text == RARE[h.start : h.end]
            continue
        name = Path(h.source).name
        assert h.source == h.doc_id == str(src / name)
        assert h.text == Path(h.source).read_text(encoding="utf-8")[h.start : h.end]
        assert h.text == DOCS[name][h.start : h.end]
    en = [h for h in hits if h.doc_id.endswith("en.md")]
    assert len(en) >= 2 and {h.title for h in en} == {"Harbour"}
    code = [h for h in hits if h.kind == "code"]
    assert {h.section for h in code} == {"def parse_config", "def main"}
    assert {h.title for h in code} == {"tool"}


def test_identical_text_ranks_its_passage_first(coll, tiny_encoder):
    rows = all_rows(coll)
    assert len(rows) >= 6
    for row in rows:
        hits = coll.search(row.text, tiny_encoder, k=3)
        assert hits[0].passage_id == row.id, row.text
        assert hits[0].text == row.text
        assert hits[0].score > hits[1].score


def test_k_limits_hits(coll, tiny_encoder):
    assert len(coll.search("snow in the mountains", tiny_encoder, k=1)) == 1
    assert len(coll.search("snow in the mountains", tiny_encoder, k=3)) == 3


@pytest.mark.parametrize(
    ("flt", "field", "value"),
    [({"lang": "de"}, "lang", "de"), ({"kind": "code"}, "kind", "code"), ({"lang": "fr"}, "lang", "fr")],
)
def test_filter_returns_only_matching_hits(coll, tiny_encoder, flt, field, value):
    expected = sorted(coll.store.filter_ids(flt))
    assert expected
    hits = coll.search("a walk in the forest", tiny_encoder, k=50, filter=flt)
    assert {getattr(h, field) for h in hits} == {value}
    assert sorted(h.passage_id for h in hits) == expected
    top = coll.search("a walk in the forest", tiny_encoder, k=1, filter=flt)
    assert top[0].passage_id == hits[0].passage_id


def test_filter_on_document_metadata_and_list(coll, tiny_encoder):
    hits = coll.search("lantern", tiny_encoder, k=10, filter={"doc_id": ["rare"]})
    assert [h.doc_id for h in hits] == ["rare"]
    hits = coll.search("lantern", tiny_encoder, k=10, filter={"lang": ["de", "fr"]})
    assert hits and {h.lang for h in hits} == {"de", "fr"}


def test_filtered_search_ranks_identical_text_first(coll, tiny_encoder):
    target = coll.store.passages(coll.store.filter_ids({"lang": "de"}))[-1]
    hits = coll.search(target.text, tiny_encoder, k=2, filter={"lang": "de"})
    assert hits[0].passage_id == target.id


def test_empty_filter_result_returns_nothing(coll, tiny_encoder):
    assert coll.search("harbour", tiny_encoder, k=5, filter={"lang": "xx"}) == []
    assert coll.search("harbour", tiny_encoder, k=5, filter={"lang": "de", "kind": "code"}) == []
    assert coll.search("harbour", tiny_encoder, k=5, hybrid=True, filter={"nope": 1}) == []


def test_invalid_filter_is_rejected(coll, tiny_encoder):
    with pytest.raises(InvalidInputError):
        coll.search("harbour", tiny_encoder, k=5, filter={"a'); DROP": 1})
    with pytest.raises(InvalidInputError):
        coll.search("harbour", tiny_encoder, k=5, filter={"lang": {"x": 1}})


def test_hybrid_finds_rare_word_first(coll, tiny_encoder):
    rare_id = coll.store.get_document("rare")["passages"][0]
    hits = coll.search("zorblaxian", tiny_encoder, k=5, hybrid=True)
    assert hits[0].passage_id == rare_id
    assert hits[0].doc_id == "rare" and "zorblaxian" in hits[0].text
    assert len(hits) == 5
    assert hits[0].score == pytest.approx(1 / 61 + 1 / (60 + _dense_rank(coll, tiny_encoder, rare_id)))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def _dense_rank(coll, encoder, pid) -> int:
    dense = [h.passage_id for h in coll.search("zorblaxian", encoder, k=100)]
    return dense.index(pid) + 1


def test_hybrid_respects_filter(coll, tiny_encoder):
    hits = coll.search("zorblaxian", tiny_encoder, k=10, hybrid=True, filter={"lang": "de"})
    assert hits and {h.lang for h in hits} == {"de"}
    assert "rare" not in {h.doc_id for h in hits}


def test_hybrid_after_reopen_uses_saved_bm25(built, tiny_encoder):
    home, _, c = built
    reopened = Collection.open(home, "c")
    try:
        hits = reopened.search("zorblaxian", tiny_encoder, k=3, hybrid=True)
        assert hits[0].doc_id == "rare"
        assert not reopened.bm25_dirty
        assert list(reopened.bm25.ids) == c.store.passage_ids()
    finally:
        reopened.close()


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "k", "match"),
    [
        ("", 5, "empty"),
        ("   \n\t", 5, "empty"),
        ("x" * (MAX_QUERY_CHARS + 1), 5, "characters"),
        ("harbour", 0, "k must be"),
        ("harbour", -1, "k must be"),
        ("harbour", 1001, "k must be"),
    ],
)
def test_bad_queries(coll, tiny_encoder, query, k, match):
    with pytest.raises(InvalidInputError, match=match):
        coll.search(query, tiny_encoder, k=k)


def test_query_at_the_length_limit_is_accepted(coll, tiny_encoder):
    assert len(coll.search("y " * (MAX_QUERY_CHARS // 2), tiny_encoder, k=1)) == 1


def test_other_encoder_is_rejected(coll, tiny_encoder):
    class Other:
        name = "some/other-model"

    with pytest.raises(InvalidInputError, match="was built with"):
        coll.search("harbour", Other(), k=1)  # type: ignore[arg-type]


def test_unknown_collection(tmp_path):
    with pytest.raises(CollectionNotFoundError):
        Collection.open(tmp_path, "missing")
    with pytest.raises(CollectionNotFoundError):
        Collection.delete(tmp_path, "missing")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "-lead", "_lead", "a b", "x" * 65, "é"])
def test_invalid_names(tmp_path, tiny_encoder, name):
    cfg = CollectionConfig(encoder=tiny_encoder.name)
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        Collection.create(tmp_path, name, cfg)
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        Collection.open(tmp_path, name)
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        Collection.delete(tmp_path, name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "collections").exists()


def test_name_with_trailing_newline_is_rejected(tmp_path, tiny_encoder):
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        Collection.create(tmp_path, "a\n", CollectionConfig(encoder=tiny_encoder.name))


def test_valid_names(tmp_path, tiny_encoder):
    for name in ("a", "A-1_b", "9" * 64):
        Collection.create(tmp_path, name, CollectionConfig(encoder=tiny_encoder.name)).close()
    assert Collection.list(tmp_path) == sorted(["a", "A-1_b", "9" * 64])


def test_create_existing_collection_fails(tmp_path, tiny_encoder):
    cfg = CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
    Collection.create(tmp_path, "c", cfg).close()
    with pytest.raises(InvalidInputError, match="already exists"):
        Collection.create(tmp_path, "c", CollectionConfig(encoder="other"))
    c = Collection.open(tmp_path, "c")  # the first configuration is kept
    try:
        assert c.config == cfg
    finally:
        c.close()


@pytest.mark.parametrize("bad", [{"spec": "Nope"}, {"rescore_with": "float16"}])
def test_create_rejects_bad_config(tmp_path, bad):
    with pytest.raises(InvalidInputError):
        Collection.create(tmp_path, "c", CollectionConfig(**bad))
    assert Collection.list(tmp_path) == []


def test_open_or_create(tmp_path, tiny_encoder):
    first = Collection.open_or_create(
        tmp_path, "c", CollectionConfig(encoder=tiny_encoder.name, max_tokens=64)
    )
    first.close()
    second = Collection.open_or_create(tmp_path, "c", CollectionConfig(encoder="ignored", max_tokens=128))
    try:
        assert second.config.encoder == tiny_encoder.name and second.config.max_tokens == 64
    finally:
        second.close()


def test_empty_collection_search(tmp_path, tiny_encoder):
    c = Collection.create(tmp_path, "empty", CollectionConfig(encoder=tiny_encoder.name))
    try:
        assert c.index is None
        assert c.search("anything", tiny_encoder, k=3) == []
        assert c.search("anything", tiny_encoder, k=3, hybrid=True, filter={"lang": "en"}) == []
    finally:
        c.close()


def test_list_and_delete(tmp_path, tiny_encoder):
    assert Collection.list(tmp_path) == []
    cfg = CollectionConfig(encoder=tiny_encoder.name)
    for name in ("beta", "alpha", "gamma"):
        Collection.create(tmp_path, name, cfg).close()
    (tmp_path / "collections" / "not-a-collection").mkdir()  # a folder without a store is not listed
    assert Collection.list(tmp_path) == ["alpha", "beta", "gamma"]
    Collection.delete(tmp_path, "beta")
    assert Collection.list(tmp_path) == ["alpha", "gamma"]
    assert not (tmp_path / "collections" / "beta").exists()
    with pytest.raises(CollectionNotFoundError):
        Collection.open(tmp_path, "beta")
    with pytest.raises(CollectionNotFoundError):
        Collection.delete(tmp_path, "beta")
    Collection.create(tmp_path, "beta", cfg).close()  # the name is free again
    assert Collection.list(tmp_path) == ["alpha", "beta", "gamma"]
