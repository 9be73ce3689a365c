"""Hamming top-k over packed binary codes: many queries against many codes, XOR + popcount + per-query
top-k, streaming over the codes so the full query x code distance matrix is never materialised.

Codes are `quantize_ubinary` output: uint8 rows of dim/8 bytes, bit-packed. `hamming_topk(queries,
codes, k)` returns `(distances, indices)`, both (num_queries, k): int32 Hamming distances and int64
code rows, sorted by ascending distance, ties broken by the lower row first (deterministic on every
backend). When k exceeds the number of codes, every code is returned and the remaining columns are
padding: index `PAD_INDEX` (-1) and distance `PAD_DISTANCE` (the int32 maximum), as faiss does.

Both implementations rank one int64 key per (query, code): `distance << 32 | row`. Keys are unique
per query, so "the k smallest keys" is exactly "the k nearest, lower row first on ties".

- Triton (CUDA tensors): a grid of (query blocks, code splits). Each program holds a running top-K
  (K = k rounded up to a power of two) for BLOCK_Q queries in registers and streams its split of the
  codes in blocks of BLOCK_N: XOR + popcount word by word into a BLOCK_Q x BLOCK_N tile of distances,
  then, only when some key of the tile beats a query's current K-th key, the tile's own top-K is
  merged into the running list (two bitonic top-K selections). Each split writes its K best keys; a
  final torch top-k over splits x K keys per query picks the k best.
- torch reference (CPU, and k above `MAX_TRITON_K`): chunks of codes against all queries, SWAR
  popcount on 64-bit words, and the same running top-k merge per chunk.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kvrag.kernels._triton import (
    HAS_TRITON,
    cpu_time_ms,
    gpu_peak_bandwidth_gbs,
    jit,
    launchable,
    libdevice,
    next_pow2,
    pick_backend,
    tl,
    triton,
)

PAD_INDEX = -1
PAD_DISTANCE = 2**31 - 1
MAX_TRITON_K = 1024  # the running list lives in registers; larger k runs the torch reference
_PAD_KEY = (PAD_DISTANCE << 32) | 0xFFFFFFFF  # int64 max: sorts after every real key
_MAX_CODES = 2**31 - 1  # a row must fit the low 32 bits of a key


# ------------------------------------------------------------------------------------------- kernel


@jit
def _hamming_topk_kernel(
    q_ptr,  # (nq, n_words) words of the queries (int32, or uint8 when dim/8 is not a multiple of 4)
    c_ptr,  # (n, n_words) words of the codes, same type
    out_ptr,  # (nq, splits, K) int64: each split's best keys per query, ascending
    nq,
    n,
    n_words,
    codes_per_split,
    blocks_per_split,
    stride_q,
    stride_c,
    stride_oq,
    stride_os,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < nq
    q_rows = q_ptr + offs_q.to(tl.int64) * stride_q
    lo = split * codes_per_split
    hi = tl.minimum(lo + codes_per_split, n)

    running = tl.full([BLOCK_Q, K], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for b in range(blocks_per_split):
        offs_n = lo + b * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        c_rows = c_ptr + offs_n.to(tl.int64) * stride_c
        dist = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.int32)
        for w in range(n_words):
            qw = tl.load(q_rows + w, mask=q_ok, other=0).to(tl.int32)
            cw = tl.load(c_rows + w, mask=n_ok, other=0).to(tl.int32)
            x = qw[:, None] ^ cw[None, :]
            if USE_POPC:
                dist += libdevice.popc(x)
            else:
                # SWAR popcount (the interpreter has no popc): 2-, 4-, 8-bit partial sums, then
                # the byte sums added into the top byte by one multiply.
                u = x.to(tl.uint32, bitcast=True)
                u = u - ((u >> 1) & 0x55555555)
                u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
                u = (u + (u >> 4)) & 0x0F0F0F0F
                u = (u * 0x01010101) >> 24
                dist += u.to(tl.int32)
        key = (dist.to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]
        key = tl.where(q_ok[:, None] & n_ok[None, :], key, 0x7FFFFFFFFFFFFFFF)
        # Merge only when some query of the block gains from this tile: after the first blocks most
        # tiles are skipped, leaving the scan bound by XOR + popcount.
        worst = tl.max(running, axis=1)
        gains = tl.sum((tl.min(key, axis=1) < worst).to(tl.int32), axis=0)
        if gains > 0:
            best = tl.topk(key, K, descending=False)
            both = tl.reshape(tl.join(running, best), [BLOCK_Q, 2 * K])
            running = tl.topk(both, K, descending=False)

    offs_k = tl.arange(0, K)
    ptrs = out_ptr + offs_q.to(tl.int64)[:, None] * stride_oq + split * stride_os + offs_k[None, :]
    tl.store(ptrs, running, mask=q_ok[:, None])


# ------------------------------------------------------------------------------------- shared parts


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype != torch.uint8 or x.dim() != 2:
        raise ValueError(
            f"{name} must be packed binary codes, uint8 (rows, dim/8); got {x.dtype} {tuple(x.shape)}"
        )
    return x


def _check(queries: Any, codes: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    queries, codes = _as_tensor(queries, "queries"), _as_tensor(codes, "codes")
    if queries.shape[1] != codes.shape[1] or queries.shape[1] == 0:
        raise ValueError(
            f"queries have {queries.shape[1]} bytes per code, codes {codes.shape[1]}; both must match and be > 0"
        )
    if queries.device != codes.device:
        raise ValueError(f"queries on {queries.device}, codes on {codes.device}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if codes.shape[0] > _MAX_CODES:
        raise ValueError(f"at most {_MAX_CODES} codes per call, got {codes.shape[0]}")
    return queries, codes, int(k)


def _unpack(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted keys (nq, <= k) -> (distances int32, indices int64) padded to k columns."""
    nq, have = keys.shape
    dist = torch.full((nq, k), PAD_DISTANCE, dtype=torch.int32, device=keys.device)
    idx = torch.full((nq, k), PAD_INDEX, dtype=torch.int64, device=keys.device)
    if have:
        real = keys != _PAD_KEY
        dist[:, :have] = torch.where(real, keys >> 32, PAD_DISTANCE).to(torch.int32)
        idx[:, :have] = torch.where(real, keys & 0xFFFFFFFF, PAD_INDEX)
    return dist, idx


# ---------------------------------------------------------------------------------------- reference


def _words64(x: torch.Tensor) -> torch.Tensor:
    """(rows, nbytes) uint8 -> (rows, ceil(nbytes/8)) int64, zero-padded (zeros XOR to zero bits)."""
    pad = -x.shape[1] % 8
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad)], dim=1)
    return x.contiguous().view(torch.int64)


def _popcount64_(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each int64, in place (SWAR; the wrapped product keeps the byte sum in the top byte)."""
    x.sub_((x >> 1) & 0x5555555555555555)
    x.copy_((x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333))
    x.add_(x >> 4).bitwise_and_(0x0F0F0F0F0F0F0F0F)
    return x.mul_(0x0101010101010101).bitwise_right_shift_(56)


def hamming_topk_torch(
    queries: Any, codes: Any, k: int, *, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: `chunk` codes at a time (default: about 4M distances per chunk) against all queries,
    keeping a running top-k, so memory stays bounded for any number of codes."""
    queries, codes, k = _check(queries, codes, k)
    nq, n = queries.shape[0], codes.shape[0]
    k_eff = min(k, n)
    if chunk is None:
        chunk = max(1024, (1 << 22) // max(nq, 1))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    qw = _words64(queries)
    best = torch.empty((nq, 0), dtype=torch.int64, device=queries.device)
    if nq == 0:
        return _unpack(best, k)
    for start in range(0, n, chunk):
        cw = _words64(codes[start : start + chunk])
        dist = torch.zeros((nq, cw.shape[0]), dtype=torch.int64, device=queries.device)
        for w in range(qw.shape[1]):
            dist += _popcount64_(qw[:, w : w + 1] ^ cw[None, :, w])
        rows = torch.arange(start, start + cw.shape[0], dtype=torch.int64, device=queries.device)
        merged = torch.cat([best, (dist << 32) | rows], dim=1)
        best = torch.topk(merged, min(k_eff, merged.shape[1]), dim=1, largest=False, sorted=True).values
    return _unpack(best, k)


# ----------------------------------------------------------------------------------------- launcher


def _words32(x: torch.Tensor) -> torch.Tensor:
    """int32 words when the row length allows it (4x fewer loads and XORs), else the bytes as they are."""
    x = x.contiguous()
    if x.shape[1] % 4 == 0 and x.storage_offset() % 4 == 0:
        return x.view(torch.int32)
    return x


def hamming_topk_triton(
    queries: torch.Tensor,
    codes: torch.Tensor,
    k: int,
    *,
    block_q: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    `block_q`, `block_n` (powers of two, block_n >= k rounded up) and `splits` (code ranges scanned by
    separate programs, default: enough programs to fill the GPU) are tuning knobs; results do not
    depend on them.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton hamming_topk kernel needs the triton package")
    queries, codes, k = _check(queries, codes, k)
    nq, n = queries.shape[0], codes.shape[0]
    k_eff = min(k, n)
    if nq == 0 or k_eff == 0:
        return _unpack(torch.empty((nq, 0), dtype=torch.int64, device=queries.device), k)
    if k_eff > MAX_TRITON_K:
        raise ValueError(f"the Triton kernel keeps at most {MAX_TRITON_K} results per query, asked {k_eff}")
    kk = next_pow2(k_eff)
    block_n = block_n or max(kk, 128)
    block_q = block_q or max(1, min(16, next_pow2(nq), 4096 // kk))
    for name, v in (("block_q", block_q), ("block_n", block_n)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if block_n < kk:
        raise ValueError(f"block_n ({block_n}) must be >= k rounded up to a power of two ({kk})")
    q_blocks = triton.cdiv(nq, block_q)
    n_blocks = triton.cdiv(n, block_n)
    if splits is None:
        splits = 1
        if queries.is_cuda:
            sms = torch.cuda.get_device_properties(queries.device).multi_processor_count
            splits = max(1, min(n_blocks, (4 * sms) // q_blocks))
    splits = max(1, min(int(splits), n_blocks))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    codes_per_split = blocks_per_split * block_n
    splits = triton.cdiv(n, codes_per_split)  # no empty split

    qw, cw = _words32(queries), _words32(codes)
    part = torch.empty((nq, splits, kk), dtype=torch.int64, device=queries.device)
    launchable(_hamming_topk_kernel)[(q_blocks, splits)](
        qw,
        cw,
        part,
        nq,
        n,
        qw.shape[1],
        codes_per_split,
        blocks_per_split,
        qw.stride(0),
        cw.stride(0),
        part.stride(0),
        part.stride(1),
        K=kk,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        USE_POPC=queries.is_cuda,
    )
    keys = part.view(nq, splits * kk)
    if splits > 1:
        keys = torch.topk(keys, k_eff, dim=1, largest=False, sorted=True).values
    else:
        keys = keys[:, :k_eff]
    return _unpack(keys, k)


def hamming_topk(
    queries: Any, codes: Any, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of each query by Hamming distance: (distances int32, indices int64), each
    (num_queries, k), ascending, lower row first on ties, padded with (PAD_DISTANCE, PAD_INDEX) when
    k exceeds the number of codes. `backend="auto"` runs Triton on CUDA tensors and the torch
    reference otherwise (and for k above MAX_TRITON_K); "torch" / "triton" force one."""
    queries, codes, k = _check(queries, codes, k)
    chosen = pick_backend(backend, (queries, codes))
    if chosen == "triton" and (backend == "triton" or min(k, codes.shape[0]) <= MAX_TRITON_K):
        return hamming_topk_triton(queries, codes, k)
    return hamming_topk_torch(queries, codes, k)


# ---------------------------------------------------------------------------------------- benchmark


def benchmark(*, quick: bool = False) -> dict[str, Any]:
    """Triton against the torch reference (and faiss GPU when available) on random 256-bit codes.

    On a CUDA GPU: 10M codes, 64 queries, k = 10, timed with `triton.testing.do_bench`, with the
    achieved code-scan bandwidth. Without one: the reference alone on a small problem.
    """
    dim_bytes, k = 32, 10
    g = torch.Generator().manual_seed(0)
    if not (HAS_TRITON and torch.cuda.is_available()):
        n, nq = (20_000, 4) if quick else (1_000_000, 16)
        codes = torch.randint(0, 256, (n, dim_bytes), dtype=torch.uint8, generator=g)
        queries = torch.randint(0, 256, (nq, dim_bytes), dtype=torch.uint8, generator=g)
        ms = cpu_time_ms(lambda: hamming_topk_torch(queries, codes, k))
        return {
            "codes": n,
            "queries": nq,
            "bits": dim_bytes * 8,
            "k": k,
            "torch_ms": round(ms, 3),
            "torch_distances_per_s": round(n * nq / (ms / 1000)),
            "torch_scan_gb_per_s": round(n * dim_bytes / (ms / 1000) / 1e9, 3),
        }

    from triton.testing import do_bench

    n, nq = 10_000_000, 64
    codes = torch.randint(0, 256, (n, dim_bytes), dtype=torch.uint8, generator=g).cuda()
    queries = torch.randint(0, 256, (nq, dim_bytes), dtype=torch.uint8, generator=g).cuda()
    tri = hamming_topk_triton(queries, codes, k)
    ref = hamming_topk_torch(queries, codes, k)
    same = bool(torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1]))
    t_ms = do_bench(lambda: hamming_topk_triton(queries, codes, k))
    r_ms = do_bench(lambda: hamming_topk_torch(queries, codes, k))
    gbs = n * dim_bytes / (t_ms / 1000) / 1e9
    peak = gpu_peak_bandwidth_gbs(codes.device)
    out: dict[str, Any] = {
        "codes": n,
        "queries": nq,
        "bits": dim_bytes * 8,
        "k": k,
        "triton_ms": round(t_ms, 4),
        "torch_ms": round(r_ms, 4),
        "speedup_vs_torch": round(r_ms / t_ms, 2),
        "matches_reference": same,
        "scan_gb_per_s": round(gbs, 1),
        "peak_gb_per_s": round(peak, 1) if peak else None,
        "pct_of_peak_bandwidth": round(100 * gbs / peak, 1) if peak else None,
    }
    # One query alone (the latency case): the codes are read once, so this is the pure scan rate.
    t1 = do_bench(lambda: hamming_topk_triton(queries[:1], codes, k))
    out["one_query_ms"] = round(t1, 4)
    out["one_query_scan_gb_per_s"] = round(n * dim_bytes / (t1 / 1000) / 1e9, 1)
    out["faiss_gpu"] = _faiss_gpu(queries, codes, k, t_ms)
    return out


def _faiss_gpu(queries: torch.Tensor, codes: torch.Tensor, k: int, triton_ms: float) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"available": False, "reason": "faiss is not installed"}
    if not hasattr(faiss, "GpuIndexBinaryFlat") or faiss.get_num_gpus() < 1:
        return {"available": False, "reason": "this faiss build has no GPU support"}
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexBinaryFlat(res, codes.shape[1] * 8)
    index.add(codes.cpu().numpy())
    qn = queries.cpu().numpy()
    index.search(qn, k)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        index.search(qn, k)
        times.append((time.perf_counter() - t0) * 1000)
    ms = sorted(times)[len(times) // 2]
    return {
        "available": True,
        "ms": round(ms, 4),
        "note": "faiss takes host queries and returns host results, so its time includes two small copies",
        "faster": "triton" if triton_ms < ms else "faiss",
        "ratio_faiss_over_triton": round(ms / triton_ms, 2),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(benchmark(), indent=2))
