"""Encoders alone and their score mixes on one BEIR data set: which teachers to distil from.

    .venv/bin/python benchmarks/score_fusion.py --data ../shared/data/cosqa \
        --encoder bundled:multilingual-e5-small --encoder bundled:all-minilm-l6-v2 --json

Each encoder embeds the corpus (through the embedding cache) and the queries; a query's score for a
passage is the cosine of their embeddings (exhaustive search, float32). Every encoder alone is the
baseline; a mix scores w x the first encoder's cosine + (1 - w) x the second's for each `--weights` w
(0.5 is what `python -m training.code_adapter --teacher A --teacher B` distils from: the teachers' mean).
Prints one JSON object: nDCG@10, recall@10 and MRR@10 per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.errors import InvalidInputError  # noqa: E402
from kvrag.rag.eval.beir import doc_text, evaluate, load_beir  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402


def ranked(scores: np.ndarray, doc_ids: list[str], query_ids: list[str], depth: int = 100) -> dict:
    """Each query's top `depth` doc ids, best first, from a queries x docs score matrix."""
    depth = min(depth, scores.shape[1])
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    return {q: [doc_ids[i] for i in top[j]] for j, q in enumerate(query_ids)}


def run(args: argparse.Namespace) -> dict:
    if len(args.encoder) not in (1, 2):
        raise InvalidInputError("give one or two --encoder specs")
    if any(not 0.0 <= w <= 1.0 for w in args.weights):
        raise InvalidInputError("--weights must lie in [0, 1]")
    data = load_beir(Path(args.data))
    doc_ids = list(data.corpus)
    query_ids = sorted(data.queries)[: args.limit] if args.limit else sorted(data.queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    texts = [doc_text(data.corpus[d]) for d in doc_ids]
    scores = []
    for spec in args.encoder:
        encoder = load_encoder(get_settings().encoder_config(spec))
        docs = encoder.encode(texts, kind="passage")
        queries = encoder.encode([data.queries[q] for q in query_ids], kind="query")
        scores.append(queries @ docs.T)

    def metrics(s: np.ndarray) -> dict:
        m = evaluate(ranked(s, doc_ids, query_ids), qrels, ks=(10,))
        return {k: round(m[k], 4) for k in ("ndcg@10", "recall@10", "mrr@10")}

    out: dict = {"data": args.data, "queries": len(query_ids), "docs": len(doc_ids), "settings": []}
    for spec, s in zip(args.encoder, scores, strict=True):
        out["settings"].append({"setting": spec, **metrics(s)})
    if len(scores) == 2:
        for w in args.weights:
            out["settings"].append(
                {"setting": f"{w} x {args.encoder[0]} + {round(1 - w, 4)} x {args.encoder[1]}"}
                | metrics(w * scores[0] + (1 - w) * scores[1])
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--encoder", action="append", required=True, help="model spec (once or twice)")
    p.add_argument("--weights", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
