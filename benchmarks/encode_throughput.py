"""Encoding throughput on SciFact passages: kvrag's encoder vs plain SentenceTransformer.encode.

Same model object, same texts, same machine, one run; the embedding cache is not used. Prints JSON.

    python benchmarks/encode_throughput.py --n 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kvrag.encoders.encoder import EncoderConfig, SentenceTransformerEncoder
from kvrag.rag.eval.beir import doc_text, load_beir
from kvrag.service.settings import get_settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="number of SciFact passages")
    ap.add_argument("--batch-size", type=int, default=32, help="SentenceTransformer.encode batch size")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()

    data = load_beir(args.data)
    texts = [doc_text(d) for d in list(data.corpus.values())[: args.n]]
    enc = SentenceTransformerEncoder(EncoderConfig(models_dir=get_settings().models_dir))
    enc.encode(texts[:8])  # warm-up
    t0 = time.perf_counter()
    ours = enc.encode(texts, kind="passage")
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = enc.model.encode(
        texts, prompt_name="passage", batch_size=args.batch_size, normalize_embeddings=True
    )
    ref_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "passages": len(texts),
                "kvrag_passages_per_s": round(len(texts) / ours_s, 2),
                "sentence_transformers_passages_per_s": round(len(texts) / ref_s, 2),
                "speedup": round(ref_s / ours_s, 3),
                "min_cosine_vs_reference": round(float((ours * ref).sum(axis=1).min()), 6),
                "st_batch_size": args.batch_size,
                "kvrag_batch_tokens": enc.config.batch_tokens,
                "mean_tokens": round(float(np.mean(enc.count_tokens(texts))), 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
