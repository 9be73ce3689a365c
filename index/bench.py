"""`kvrag bench index`: float flat vs binary flat (+ rescoring) on the same synthetic vectors.

The data imitates sentence embeddings: unit vectors drawn around a few thousand cluster centres
that share a common offset, so binary codes face the same centring problem as real e5 vectors.
Ground truth is exact float inner-product search over the same data.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from kvrag.index.vector import VectorIndex


def synthetic_embeddings(
    n: int, dim: int, *, seed: int = 0, clusters: int = 4096, chunk: int = 100_000
) -> np.ndarray:
    """Deterministic unit vectors: shared offset + cluster centre + noise."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(dim).astype(np.float32) * 0.8
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = (
            offset
            + centres[rng.integers(0, clusters, m)]
            + 0.9 * rng.standard_normal((m, dim)).astype(np.float32)
        )
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _time_queries(index: VectorIndex, q: np.ndarray, k: int, rescore: int) -> tuple[float, np.ndarray]:
    """Mean latency of one query at a time (the serving pattern), and the ids found."""
    ids = np.empty((len(q), k), dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(len(q)):
        _, ids[i] = index.search(q[i : i + 1], k, rescore=rescore)
    return 1000 * (time.perf_counter() - t0) / len(q), ids


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def run_index_bench(
    *, n: int = 1_000_000, dim: int = 384, queries: int = 200, k: int = 10, rescore: int = 4, seed: int = 0
) -> dict:
    """Build both indexes on the same vectors, time single-query and batched search, compare."""
    x = synthetic_embeddings(n, dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    q = x[rng.choice(n, queries, replace=False)] + 0.05 * rng.standard_normal((queries, dim)).astype(
        np.float32
    )
    ids = np.arange(n, dtype=np.int64)
    latency_q = q[: min(queries, 50)]

    with tempfile.TemporaryDirectory(prefix="kvrag-bench-") as tmp:
        t0 = time.perf_counter()
        flat = VectorIndex("Flat", dim)
        flat.add(ids, x)
        float_build = time.perf_counter() - t0
        float_bytes = flat.index_bytes()
        float_ms, truth = _time_queries(flat, latency_q, k, 1)
        t0 = time.perf_counter()
        _, truth_all = flat.search(q, k)
        float_batch_ms = 1000 * (time.perf_counter() - t0) / queries
        del flat

        t0 = time.perf_counter()
        binary = VectorIndex("BFlat", dim)
        binary.add(ids, x)
        binary_build = time.perf_counter() - t0
        binary.save(tmp)  # rescoring then reads float vectors memory-mapped from disk
        binary = VectorIndex.load(tmp)
        binary_bytes = binary.index_bytes()
        binary_ms, found = _time_queries(binary, latency_q, k, 1)
        rescore_ms, found_rescored = _time_queries(binary, latency_q, k, rescore)
        t0 = time.perf_counter()
        _, found_all = binary.search(q, k)
        binary_batch_ms = 1000 * (time.perf_counter() - t0) / queries

    return {
        "n": n,
        "dim": dim,
        "k": k,
        "queries": queries,
        "latency_queries": len(latency_q),
        "float_bytes": float_bytes,
        "binary_bytes": binary_bytes,
        "bytes_ratio": round(float_bytes / binary_bytes, 2),
        "float_build_s": round(float_build, 2),
        "binary_build_s": round(binary_build, 2),
        "float_ms_per_query": round(float_ms, 3),
        "binary_ms_per_query": round(binary_ms, 3),
        "binary_rescore_ms_per_query": round(rescore_ms, 3),
        "speedup": round(float_ms / binary_ms, 2),
        "speedup_with_rescore": round(float_ms / rescore_ms, 2),
        "float_batch_ms_per_query": round(float_batch_ms, 3),
        "binary_batch_ms_per_query": round(binary_batch_ms, 3),
        "batch_speedup": round(float_batch_ms / binary_batch_ms, 2),
        "binary_recall@k": round(_recall(found_all, truth_all), 4),
        "binary_rescore_recall@k": round(_recall(found_rescored, truth), 4),
        "rescore": rescore,
    }
