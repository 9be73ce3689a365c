"""KV codec sizes, error and speed on real passage caches, every codec against fp32 in one run.

    .venv/bin/python benchmarks/kv_codec.py --data ../shared/data/xquad/xquad.en.json --n 24 --json

Computes the caches of the first N paragraphs with the bundled generator (after its prefix), encodes
each with fp32, fp16 and int8, and prints one JSON object: bytes per passage and per token, size
ratios, the relative reconstruction error of keys and values, and encode/decode times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvrag.rag.eval.squad import load_squad  # noqa: E402
from kvrag.rag.kvcache.codec import decode_kv, encode_kv  # noqa: E402
from kvrag.service.runtime import open_generator  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/xquad/xquad.en.json")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    gen = open_generator(get_settings(), prompt="extractive")
    paragraphs, _ = load_squad(args.data)
    ids = [gen.passage_ids(p.context, p.title) for p in paragraphs[: args.n]]
    caches = gen.encode_passages(ids, gen.encode_prefix())
    tokens = sum(c.tokens for c in caches)
    out: dict = {
        "benchmark": "kv_codec",
        "generator": gen.spec,
        "passages": len(caches),
        "tokens_per_passage_mean": round(tokens / len(caches), 1),
    }
    sizes = {}
    for codec in ("fp32", "fp16", "int8"):
        blobs, enc, dec, kerr, verr = [], [], [], [], []
        for c in caches:
            t0 = time.perf_counter()
            b = encode_kv(c.keys, c.values, codec=codec)
            t1 = time.perf_counter()
            k, v = decode_kv(b)
            t2 = time.perf_counter()
            blobs.append(len(b))
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            kerr.append(((k - c.keys).norm() / c.keys.norm()).item())
            verr.append(((v - c.values).norm() / c.values.norm()).item())
        sizes[codec] = sum(blobs)
        out[codec] = {
            "bytes_per_passage_mean": round(sum(blobs) / len(blobs)),
            "bytes_per_token": round(sum(blobs) / tokens, 1),
            "key_rel_error": round(statistics.mean(kerr), 5),
            "value_rel_error": round(statistics.mean(verr), 5),
            "encode_ms_per_passage": round(statistics.median(enc) * 1000, 3),
            "decode_ms_per_passage": round(statistics.median(dec) * 1000, 3),
        }
    out["int8_smaller_than_fp32"] = round(sizes["fp32"] / sizes["int8"], 3)
    out["int8_smaller_than_fp16"] = round(sizes["fp16"] / sizes["int8"], 3)
    out["fp16_smaller_than_fp32"] = round(sizes["fp32"] / sizes["fp16"], 3)
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
