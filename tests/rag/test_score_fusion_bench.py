"""benchmarks/score_fusion.py on a tiny BEIR set with the tiny random encoder: the ranking helper,
and the mixes at the end points reproduce each encoder alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from kvrag.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fusion():
    spec = importlib.util.spec_from_file_location("score_fusion", ROOT / "benchmarks" / "score_fusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _beir(folder: Path) -> Path:
    docs = [
        ("d0", "def add(a, b):\n    return a + b"),
        ("d1", "def read_file(path):\n    return open(path).read()"),
        ("d2", "def reverse(s):\n    return s[::-1]"),
        ("d3", "def mean(xs):\n    return sum(xs) / len(xs)"),
    ]
    queries = [("q0", "python add two numbers"), ("q1", "read a file python"), ("q2", "reverse string")]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs))
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries)
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n"
    )
    return folder


def test_ranked_orders_best_first(fusion):
    s = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    assert fusion.ranked(s, ["a", "b", "c"], ["x", "y"], depth=2) == {"x": ["b", "c"], "y": ["a", "c"]}


class _Fixed:
    """An encoder that looks its vectors up: passages d0..d3 are the unit axes; queries as given."""

    def __init__(self, queries: dict[str, list[float]], docs: list[str]):
        self.q, self.docs = queries, docs

    def encode(self, texts, *, kind="passage", **_):
        if kind == "passage":
            return np.eye(4, dtype=np.float32)[[self.docs.index(t) for t in texts]]
        return np.array([self.q[t] for t in texts], dtype=np.float32)


def test_each_encoder_alone_and_their_mix(fusion, tmp_path, monkeypatch):
    import argparse

    data = _beir(tmp_path / "beir")
    docs = [json.loads(line)["text"] for line in (data / "corpus.jsonl").read_text().splitlines()]
    q0, q1, q2 = "python add two numbers", "read a file python", "reverse string"
    # A misses q1 (d2 first, the right d1 second); B misses q0 and q2; the mean of both gets all three
    a = _Fixed({q0: [1, 0, 0, 0], q1: [0, 0.6, 0.8, 0], q2: [0, 0, 1, 0]}, docs)
    b = _Fixed({q0: [0.6, 0, 0, 0.8], q1: [0, 1, 0, 0], q2: [0, 0, 0.6, 0.8]}, docs)
    monkeypatch.setattr(fusion, "load_encoder", lambda cfg: a if cfg.model == "A" else b)
    out = fusion.run(
        argparse.Namespace(data=str(data), encoder=["A", "B"], weights=[1.0, 0.5, 0.0], limit=None)
    )
    rows = {r["setting"]: r for r in out["settings"]}
    assert out["queries"] == 3 and out["docs"] == 4 and len(rows) == 5
    assert rows["A"]["mrr@10"] == pytest.approx(round(2.5 / 3, 4))
    assert rows["B"]["mrr@10"] == pytest.approx(round(2 / 3, 4))
    assert rows["1.0 x A + 0.0 x B"] == {**rows["A"], "setting": "1.0 x A + 0.0 x B"}
    assert rows["0.0 x A + 1.0 x B"] == {**rows["B"], "setting": "0.0 x A + 1.0 x B"}
    assert rows["0.5 x A + 0.5 x B"]["ndcg@10"] == 1.0
    with pytest.raises(InvalidInputError, match="weights"):
        fusion.run(argparse.Namespace(data=str(data), encoder=["A", "B"], weights=[1.5], limit=None))
    with pytest.raises(InvalidInputError, match="one or two"):
        fusion.run(argparse.Namespace(data=str(data), encoder=["A", "B", "A"], weights=[0.5], limit=None))
