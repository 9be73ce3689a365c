"""benchmarks/score_fusion.py run as a script on a tiny BEIR set with two tiny random encoders: each
encoder alone matches an in-process evaluation of its cosine ranking, and the mixes at the end points
reproduce each encoder alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "score_fusion.py"
DOCS = [
    ("d0", "def add(a, b):\n    return a + b"),
    ("d1", "def read_file(path):\n    return open(path).read()"),
    ("d2", "def reverse(s):\n    return s[::-1]"),
    ("d3", "def mean(xs):\n    return sum(xs) / len(xs)"),
]
QUERIES = [("q0", "python add two numbers"), ("q1", "read a file python"), ("q2", "reverse string")]


def _beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in DOCS))
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in QUERIES)
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n"
    )
    return folder


@pytest.fixture(scope="module")
def encoders(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny encoder and a copy of it with other random weights."""
    import torch
    from transformers import BertConfig, BertModel

    other = tmp_path_factory.mktemp("tiny-encoder-b")
    shutil.copytree(tiny_model_dir, other, dirs_exist_ok=True)
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(str(tiny_model_dir))).save_pretrained(other)
    return tiny_model_dir, other


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVRAG_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _alone(encoder: Path, data: Path) -> dict:
    """nDCG@10, recall@10 and MRR@10 of one encoder's exhaustive cosine ranking, computed here."""
    from kvrag.encoders.encoder import EncoderConfig, SentenceTransformerEncoder
    from kvrag.rag.eval.beir import evaluate

    enc = SentenceTransformerEncoder(EncoderConfig(model=str(encoder)))
    scores = enc.encode([q for _, q in QUERIES], kind="query") @ enc.encode([t for _, t in DOCS]).T
    ranking = {
        qid: [DOCS[i][0] for i in np.argsort(-scores[j], kind="stable")] for j, (qid, _) in enumerate(QUERIES)
    }
    qrels = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d2": 1}}
    m = evaluate(ranking, qrels, ks=(10,))
    return {k: round(m[k], 4) for k in ("ndcg@10", "recall@10", "mrr@10")}


def test_each_encoder_alone_and_their_mix(encoders, tmp_path):
    a, b = encoders
    data = _beir(tmp_path / "beir")
    proc = _run(
        tmp_path,
        "--data",
        str(data),
        "--encoder",
        str(a),
        "--encoder",
        str(b),
        "--weights",
        "1.0",
        "0.5",
        "0.0",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = {r.pop("setting"): r for r in out["settings"]}
    assert out["queries"] == 3 and out["docs"] == 4 and len(rows) == 5
    assert rows[str(a)] == _alone(a, data) and rows[str(b)] == _alone(b, data)
    assert rows[f"1.0 x {a} + 0.0 x {b}"] == rows[str(a)]
    assert rows[f"0.0 x {a} + 1.0 x {b}"] == rows[str(b)]
    assert all(0.0 <= v <= 1.0 for r in rows.values() for v in r.values())


def test_bad_options_fail(encoders, tmp_path):
    a, _ = encoders
    data = _beir(tmp_path / "beir")
    proc = _run(tmp_path, "--data", str(data), "--encoder", str(a), "--encoder", str(a), "--weights", "1.5")
    assert proc.returncode != 0 and "--weights must lie in [0, 1]" in proc.stderr
    proc = _run(tmp_path, "--data", str(data), *["--encoder", str(a)] * 3)
    assert proc.returncode != 0 and "give one or two --encoder specs" in proc.stderr
