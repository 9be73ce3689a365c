"""Tests for rag.eval.beir: BEIR-layout loading and retrieval metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvrag.errors import InvalidInputError
from kvrag.rag.eval.beir import BeirData, doc_text, evaluate, load_beir

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"shared evaluation data not found at {DATA} (../shared/data from the project root)",
)

DEFAULT_KEYS = {
    "ndcg@10", "ndcg@100", "recall@10", "recall@100", "mrr@10", "map@10", "precision@10",
}  # fmt: skip


# --------------------------------------------------------------------------------------------- metrics


def test_hand_computed_graded_example():
    # Relevant {a: 1, b: 2}, ranking [c, b, a]:
    #   DCG  = 0/log2(2) + 2/log2(3) + 1/log2(4) = 1.2618595 + 0.5 = 1.7618595
    #   IDCG = 2/log2(2) + 1/log2(3)             = 2 + 0.6309298 = 2.6309298
    #   nDCG@10 = 1.7618595 / 2.6309298 = 0.6696718
    #   recall@10 = 2/2 = 1; MRR@10 = 1/2 (first relevant at rank 2)
    #   MAP@10 = (P@2 + P@3) / 2 = (1/2 + 2/3) / 2 = 0.5833333; P@10 = 2/10
    m = evaluate({"q": ["c", "b", "a"]}, {"q": {"a": 1, "b": 2}})
    assert set(m) == DEFAULT_KEYS
    expected_ndcg = (2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx(expected_ndcg, abs=1e-12)
    assert m["ndcg@10"] == pytest.approx(0.6696718, abs=1e-6)
    assert m["ndcg@100"] == pytest.approx(expected_ndcg, abs=1e-12)
    assert m["recall@10"] == 1.0
    assert m["recall@100"] == 1.0
    assert m["mrr@10"] == 0.5
    assert m["map@10"] == pytest.approx(7 / 12)
    assert m["precision@10"] == pytest.approx(0.2)


def test_graded_relevance_order_matters():
    qrels = {"q": {"a": 1, "b": 2}}
    best = evaluate({"q": ["b", "a"]}, qrels)
    # [a, b]: DCG = 1 + 2/log2(3) = 2.2618595; IDCG = 2 + 1/log2(3) = 2.6309298 -> 0.8597186
    worse = evaluate({"q": ["a", "b"]}, qrels)
    assert best["ndcg@10"] == pytest.approx(1.0)
    assert worse["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert worse["ndcg@10"] == pytest.approx(0.8597186, abs=1e-6)
    # Binary metrics ignore the grades.
    for key in ("recall@10", "mrr@10", "map@10", "precision@10"):
        assert best[key] == worse[key]


def test_perfect_ranking_scores_one():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}
    m = evaluate({"q1": ["a", "x"], "q2": ["c", "b", "y"]}, qrels)
    for key in ("ndcg@10", "ndcg@100", "recall@10", "recall@100", "mrr@10", "map@10"):
        assert m[key] == pytest.approx(1.0), key
    # P@10 divides by 10 even when fewer docs are retrieved: (1/10 + 2/10) / 2.
    assert m["precision@10"] == pytest.approx(0.15)


def test_empty_results_score_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2}}
    for results in ({}, {"q1": [], "q2": []}, {"q1": ["x"], "q2": ["y", "z"]}):
        m = evaluate(results, qrels)
        assert set(m) == DEFAULT_KEYS
        assert all(v == 0.0 for v in m.values()), (results, m)


def test_missing_query_counts_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    m = evaluate({"q1": ["a"]}, qrels)
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@10"):
        assert m[key] == pytest.approx(0.5), key


def test_unjudged_queries_in_results_are_ignored():
    m = evaluate({"q1": ["a"], "other": ["z"]}, {"q1": {"a": 1}})
    assert m["ndcg@10"] == 1.0


def test_cutoffs():
    # The only relevant doc is at rank 11: outside the top 10, inside the top 100.
    ranking = [f"n{i}" for i in range(10)] + ["a"]
    m = evaluate({"q": ranking}, {"q": {"a": 1}})
    assert m["ndcg@10"] == 0.0
    assert m["recall@10"] == 0.0
    assert m["mrr@10"] == 0.0
    assert m["map@10"] == 0.0
    assert m["recall@100"] == 1.0
    assert m["ndcg@100"] == pytest.approx(1 / math.log2(12))  # IDCG = 1


def test_recall_and_map_count_unretrieved_relevant_docs():
    # 4 relevant docs, 1 retrieved at rank 1: recall = 1/4, AP@10 = (1/1) / 4.
    m = evaluate({"q": ["a", "x"]}, {"q": {"a": 1, "b": 1, "c": 1, "d": 1}})
    assert m["recall@10"] == pytest.approx(0.25)
    assert m["map@10"] == pytest.approx(0.25)
    assert m["mrr@10"] == 1.0
    # IDCG@10 over the 4 judged docs: 1 + 1/log2(3) + 1/2 + 1/log2(5).
    assert m["ndcg@10"] == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)))


def test_duplicates_in_ranking_count_once():
    m = evaluate({"q": ["a", "a", "a"]}, {"q": {"a": 1, "b": 1}})
    assert m["recall@10"] == pytest.approx(0.5)
    assert m["precision@10"] == pytest.approx(0.1)


def test_non_positive_judgements_are_not_relevant():
    qrels = {"q1": {"a": 1, "z": 0}, "q2": {"b": 0}}  # q2 has no relevant doc: not averaged
    m = evaluate({"q1": ["z", "a"]}, qrels)
    assert m["recall@10"] == 1.0
    assert m["mrr@10"] == 0.5
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_custom_ks_and_errors():
    m = evaluate({"q": ["a"]}, {"q": {"a": 1}}, ks=(1, 5))
    assert set(m) == {"ndcg@1", "ndcg@5", "recall@1", "recall@5", "mrr@10", "map@10", "precision@10"}
    with pytest.raises(InvalidInputError):
        evaluate({"q": ["a"]}, {"q": {"a": 1}}, ks=(0,))
    with pytest.raises(InvalidInputError, match="nothing to evaluate"):
        evaluate({}, {})


# --------------------------------------------------------------------------------------------- loading


def _write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_qrels(path: Path, rows: list[tuple[str, str, int]], header: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{s}" for q, d, s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _make_dataset(root: Path, *, lang: str = "en") -> Path:
    _write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": f"Title {lang}", "text": f"first {lang}"},
            {"_id": "d2", "title": "", "text": f"second {lang}"},
            {"_id": "d3", "text": f"third {lang}"},  # no title
        ],
    )
    _write_jsonl(
        root / "queries.jsonl",
        [
            {"_id": "q1", "text": f"query one {lang}"},
            {"_id": "q2", "text": f"query two {lang}"},
            {"_id": "q3", "text": "no judgements"},
            {"_id": "q4", "text": "only a zero judgement"},
        ],
    )
    _write_qrels(
        root / "qrels" / "test.tsv", [("q1", "d1", 1), ("q1", "d2", 2), ("q2", "d3", 1), ("q4", "d1", 0)]
    )
    return root


def test_load_beir_basic(tmp_path):
    data = load_beir(_make_dataset(tmp_path))
    assert isinstance(data, BeirData)
    assert data.corpus == {
        "d1": {"title": "Title en", "text": "first en"},
        "d2": {"title": "", "text": "second en"},
        "d3": {"title": "", "text": "third en"},
    }
    assert data.queries == {"q1": "query one en", "q2": "query two en"}  # q3, q4 dropped
    assert data.qrels == {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}
    assert load_beir(str(tmp_path), split="test") == data


def test_load_beir_cross_lingual_corpus_dir(tmp_path):
    en = _make_dataset(tmp_path / "en", lang="en")
    de = _make_dataset(tmp_path / "de", lang="de")
    data = load_beir(en, corpus_dir=de)
    assert data.queries["q1"] == "query one en"
    assert data.corpus["d1"] == {"title": "Title de", "text": "first de"}
    assert data.qrels == {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}


def test_load_beir_split_selection(tmp_path):
    root = _make_dataset(tmp_path)
    (root / "qrels" / "test.tsv").rename(root / "qrels" / "dev.tsv")
    assert load_beir(root).qrels["q2"] == {"d3": 1}  # the only tsv
    _write_qrels(root / "qrels" / "train.tsv", [("q2", "d1", 1)])
    with pytest.raises(InvalidInputError, match="several splits"):
        load_beir(root)
    assert load_beir(root, split="train").qrels == {"q2": {"d1": 1}}
    _write_qrels(root / "qrels" / "test.tsv", [("q1", "d3", 1)], header=False)
    assert load_beir(root).qrels == {"q1": {"d3": 1}}  # several: prefer test
    with pytest.raises(InvalidInputError, match=r"no split 'valid'.*available: dev, test, train"):
        load_beir(root, split="valid")


def test_load_beir_missing_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_beir(tmp_path / "nope")
    root = _make_dataset(tmp_path / "a")
    with pytest.raises(InvalidInputError, match="corpus folder"):
        load_beir(root, corpus_dir=tmp_path / "nope")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(InvalidInputError, match=r"missing file .*corpus\.jsonl"):
        load_beir(root)
    root = _make_dataset(tmp_path / "b")
    (root / "queries.jsonl").unlink()
    with pytest.raises(InvalidInputError, match=r"missing file .*queries\.jsonl"):
        load_beir(root)
    root = _make_dataset(tmp_path / "c")
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(InvalidInputError, match=r"no \.tsv file"):
        load_beir(root)
    (root / "qrels").rmdir()
    with pytest.raises(InvalidInputError, match="missing folder"):
        load_beir(root)


@pytest.mark.parametrize(
    ("file", "content", "pattern"),
    [
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n',
            r"corpus\.jsonl, line 2: not valid JSON",
        ),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "ok"}\n\n["d2"]\n',
            r"corpus\.jsonl, line 3: expected a JSON object",
        ),
        ("corpus.jsonl", '{"_id": "d1", "title": "t"}\n', r'corpus\.jsonl, line 1: missing "text"'),
        ("corpus.jsonl", '{"text": "x"}\n', r'corpus\.jsonl, line 1: missing or invalid "_id"'),
        ("corpus.jsonl", '{"_id": "d1", "text": 5}\n', r'corpus\.jsonl, line 1: "text" must be a string'),
        (
            "corpus.jsonl",
            '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
            r"line 2: duplicate document id",
        ),
        ("corpus.jsonl", "\n", r"corpus\.jsonl holds no documents"),
        (
            "queries.jsonl",
            '{"_id": "q1", "text": "a"}\n{"_id": "q2"}\n',
            r'queries\.jsonl, line 2: missing "text"',
        ),
        (
            "qrels/test.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\n",
            r"test\.tsv, line 2: expected 3 tab-separated",
        ),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", r"test\.tsv, line 2: score 'high'"),
        ("qrels/test.tsv", "q1\td1\t0\n", r"test\.tsv holds no relevance judgement"),
        (
            "qrels/test.tsv",
            "q1\td1\t1\nq9\td1\t1\n",
            r"test\.tsv judges 1 query that .*queries\.jsonl does not contain",
        ),
        ("qrels/test.tsv", "q1\tzz\t1\n", r"none of the 1 documents judged"),
    ],
)
def test_load_beir_malformed(tmp_path, file, content, pattern):
    root = _make_dataset(tmp_path)
    (root / file).write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=pattern):
        load_beir(root)


def test_qrels_float_scores_and_whitespace(tmp_path):
    root = _make_dataset(tmp_path)
    (root / "qrels" / "test.tsv").write_text("q1 d1 1.0\r\nq2 d3 -1\r\n", encoding="utf-8")
    data = load_beir(root)
    assert data.qrels == {"q1": {"d1": 1}}
    assert set(data.queries) == {"q1"}


def test_doc_text():
    assert doc_text({"title": "T", "text": "body"}) == "T body"
    assert doc_text({"title": "", "text": "body"}) == "body"
    assert doc_text({"text": "body"}) == "body"


# --------------------------------------------------------------------------------------------- real data


@needs_data
def test_scifact_loads():
    data = load_beir(DATA / "scifact")
    assert len(data.corpus) == 5183
    assert len(data.queries) == 300
    assert sum(len(rels) for rels in data.qrels.values()) == 339
    assert set(data.queries) == set(data.qrels)
    # An oracle ranking (relevant docs first, by grade) is perfect.
    oracle = {q: sorted(rels, key=rels.get, reverse=True) for q, rels in data.qrels.items()}
    assert evaluate(oracle, data.qrels)["ndcg@10"] == pytest.approx(1.0)


@needs_data
def test_xquad_en_loads():
    data = load_beir(DATA / "xquad" / "retrieval" / "en")
    assert len(data.corpus) == 240
    assert set(data.corpus) == {f"p{i}" for i in range(240)}
    assert len(data.queries) == 1190  # MTEB deduplicates to about 1,186; we keep every question
    assert all(len(rels) == 1 for rels in data.qrels.values())


@needs_data
def test_xquad_cross_lingual_loads():
    en = load_beir(DATA / "xquad" / "retrieval" / "en")
    en_de = load_beir(DATA / "xquad" / "retrieval" / "en", corpus_dir=DATA / "xquad" / "retrieval" / "de")
    assert en_de.queries == en.queries
    assert en_de.qrels == en.qrels
    assert set(en_de.corpus) == set(en.corpus)
    assert en_de.corpus["p0"] != en.corpus["p0"]


@needs_data
def test_cosqa_loads_dev_split():
    data = load_beir(DATA / "cosqa")  # the only tsv is dev.tsv
    assert len(data.corpus) == 6267
    assert len(data.queries) == 500
