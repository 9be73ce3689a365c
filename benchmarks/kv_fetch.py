"""Redis as a KV tier: fetch k passage caches in one round trip (MGET) and compare the throughput
with `redis-benchmark` GET of the same value size against the same server, in one run.

    .venv/bin/python benchmarks/kv_fetch.py --url redis://127.0.0.1:6379/15 --k 10 --tokens 200 --json

The blobs are real codec output for SmolLM2-135M's cache shape (30 layers, 3 KV heads, head dim 64)
filled with random values. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvrag.rag.kvcache.codec import decode_kv, encode_kv  # noqa: E402
from kvrag.rag.kvcache.store import RedisStore  # noqa: E402


def redis_benchmark_get(host: str, port: int, size: int, n: int, password: str | None) -> dict | None:
    """GET throughput of redis-benchmark (one client, no pipelining) for values of `size` bytes."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    cmd = [
        exe,
        "-h",
        host,
        "-p",
        str(port),
        "-t",
        "set,get",
        "-d",
        str(size),
        "-n",
        str(n),
        "-c",
        "1",
        "--csv",
    ]
    if password:
        cmd += ["-a", password]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "GET":
            rps = float(cells[1])
            return {"rps": rps, "gb_s": rps * size / 1e9, "p50_ms": float(cells[4])}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per passage")
    ap.add_argument("--codec", default="fp16", choices=["fp16", "int8", "fp32"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    prefix = f"kvrag-bench-{uuid.uuid4().hex[:8]}:"
    sep = "&" if "?" in args.url else "?"
    store = RedisStore(f"{args.url}{sep}prefix={prefix}&timeout=10")
    if not store.ping():
        print(json.dumps({"error": f"no Redis server at {store.url}"}))
        return 1
    g = torch.Generator().manual_seed(0)
    blobs = {}
    for i in range(args.k):
        k = torch.randn(30, 3, args.tokens, 64, generator=g)
        v = torch.randn(30, 3, args.tokens, 64, generator=g)
        blobs[f"kvrag:kv:p:bench{i}"] = encode_kv(k, v, codec=args.codec)
    size = len(next(iter(blobs.values())))
    keys = list(blobs)
    try:
        store.put_many(blobs)
        store.get_many(keys)  # warm-up
        fetch, decode, trips = [], [], []
        for _ in range(args.repeats):
            before = store.stats()["round_trips"]
            t0 = time.perf_counter()
            got = store.get_many(keys)
            t1 = time.perf_counter()
            for b in got:
                decode_kv(b, dtype=torch.float32)
            t2 = time.perf_counter()
            assert all(b is not None for b in got)
            trips.append(store.stats()["round_trips"] - before)
            fetch.append(t1 - t0)
            decode.append(t2 - t1)
    finally:
        store.delete_many(keys)
    parts = urlsplit(args.url)
    bench = redis_benchmark_get(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        size,
        max(50, args.repeats * args.k),
        parts.password,
    )
    total = size * args.k
    med = statistics.median(fetch)
    result = {
        "benchmark": "kv_fetch",
        "url": store.url,
        "codec": args.codec,
        "k": args.k,
        "tokens_per_passage": args.tokens,
        "value_bytes": size,
        "bytes_per_fetch": total,
        "round_trips_per_fetch": statistics.median(trips),
        "fetch_ms": round(med * 1000, 3),
        "fetch_gb_s": round(total / med / 1e9, 3),
        "decode_ms": round(statistics.median(decode) * 1000, 3),
        "redis_benchmark_get_gb_s": round(bench["gb_s"], 3) if bench else None,
        "redis_benchmark_get_p50_ms": bench["p50_ms"] if bench else None,
        "ratio_vs_redis_benchmark": round(total / med / 1e9 / bench["gb_s"], 3) if bench else None,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
