"""Matryoshka adaptors and binary rotations: retrieval quality against full-dimension float, one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/matryoshka.py --data ../shared/data/scifact --json

The corpus is encoded once (through the embedding cache), its pseudo-queries (each passage's title
or first sentence, `encoders.adaptor.pseudo_query`) once, and the test queries once; every setting
then builds its own index (`VectorIndex`, exactly as `kvrag eval retrieval` does: adaptors and
rotations are fitted on the corpus, never on the test queries) and answers the same queries.
Settings: float32 at full dimension (the baseline); float32 at each `--dims` for adaptor none /
pca / learned, the fitted ones on passages alone and on passages plus pseudo-queries; ubinary at full
dimension with rotation itq or none (mean-centring), each fitted both ways, and itq after a learned
adaptor (which a binary index trains at its own dimension only); every binary setting without and
with `--rescore`x float rescoring. Prints one JSON object: nDCG@10 and recall@100 per setting and
nDCG@10 as a fraction of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvrag.encoders.adaptor import encode_pseudo_queries  # noqa: E402
from kvrag.encoders.compress import truncate  # noqa: E402
from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.index.vector import VectorIndex  # noqa: E402
from kvrag.rag.eval.beir import doc_text, evaluate, load_beir  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    data = load_beir(Path(args.data))
    doc_ids = list(data.corpus)
    query_ids = sorted(data.queries)[: args.limit] if args.limit else sorted(data.queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    encoder = load_encoder(get_settings().encoder_config(args.encoder))
    docs = encoder.encode([doc_text(data.corpus[d]) for d in doc_ids], kind="passage")
    queries = encoder.encode([data.queries[q] for q in query_ids], kind="query")
    pseudo = encode_pseudo_queries(
        encoder, [(data.corpus[d].get("text", ""), data.corpus[d].get("title")) for d in doc_ids]
    )
    full = encoder.dim

    def score(
        spec: str,
        dim: int,
        *,
        adaptor: str = "none",
        rotation: str = "itq",
        rescore: int = 1,
        pseudo_queries: bool = False,
    ) -> dict:
        t0 = time.perf_counter()
        adapted = adaptor != "none"
        index = VectorIndex(
            spec,
            dim,
            encoder=encoder.name,
            binary_method="itq" if rotation == "itq" else "mean",
            adaptor=adaptor,
            input_dim=full if adapted else None,
        )
        fit_queries = (pseudo if adapted else truncate(pseudo, dim)) if pseudo_queries else None
        index.add(np.arange(len(doc_ids)), docs if adapted else truncate(docs, dim), fit_queries=fit_queries)
        build_s = time.perf_counter() - t0
        _, ids = index.search(queries if adapted else truncate(queries, dim), 100, rescore=rescore)
        results = {
            q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, ids.tolist(), strict=True)
        }
        metrics = evaluate(results, qrels, ks=(10, 100))
        return {
            "precision": index.spec.precision,
            "dim": dim,
            "adaptor": adaptor,
            "rotation": rotation if index.spec.precision == "ubinary" else None,
            "rescore": rescore,
            "pseudo_queries": pseudo_queries,
            "ndcg@10": round(metrics["ndcg@10"], 4),
            "recall@100": round(metrics["recall@100"], 4),
            "build_seconds": round(build_s, 2),
        }

    rows = [score("Flat", full)]
    for dim in args.dims:
        for adaptor in args.adaptors:
            for pq in (False, True) if adaptor != "none" else (False,):
                rows.append(score("Flat", dim, adaptor=adaptor, pseudo_queries=pq))
                print(json.dumps(rows[-1]), file=sys.stderr)
    binary = [("none", "itq", False), ("none", "itq", True), ("none", "none", False), ("none", "none", True)]
    if "learned" in args.adaptors:
        binary.insert(2, ("learned", "itq", True))
    for adaptor, rotation, pq in binary:
        for rescore in (1, args.rescore):
            rows.append(
                score("BFlat", full, adaptor=adaptor, rotation=rotation, rescore=rescore, pseudo_queries=pq)
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["ndcg@10"]
    for r in rows:
        r["ndcg@10_vs_full_float"] = round(r["ndcg@10"] / base, 4)
    return {
        "data": str(args.data),
        "encoder": encoder.name,
        "docs": len(doc_ids),
        "queries": len(query_ids),
        "baseline": rows[0],
        "settings": rows[1:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="BEIR-layout folder, e.g. ../shared/data/scifact")
    p.add_argument("--encoder", help="model spec (default: the configured encoder)")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 128, 64])
    p.add_argument("--adaptors", nargs="+", default=["none", "pca", "learned"])
    p.add_argument("--rescore", type=int, default=4)
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--json", action="store_true", help="print JSON (always; kept for symmetry)")
    print(json.dumps(run(p.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
