"""APE query/decoding attention: a Triton kernel, its pure-torch reference and the dispatcher the
generator calls.

Shapes: query (B, H, Q, D); key/value (B, Hkv, N, D), H a multiple of Hkv (grouped-query attention).
Cache slots `[c_start, c_end)` are the passages (group C: non-causal, temperature T, padded slots
masked by `c_valid`); the rest is the prefix and the query/generated tail (group O: causal). The two
groups are merged with weights softmax([S*T*LSE_C, LSE_O]) computed in float32.

Triton kernel, one pass over the cache per block of query rows:

- GQA: the rep = H / Hkv query heads sharing a KV head are served by the same programs. Their
  rep x Q rows (head kvh*rep + r, token i) form one row space of length rep*Q, cut into BLOCK_M
  rows per program, so each K/V tile loaded serves every query head of its group.
- Grid (row blocks, B * Hkv, splits). Each program runs two online softmaxes (running max, sum and
  float32 accumulator, in base 2) over BLOCK_N-slot tiles: the passage slots with scores scaled by
  1/T and padded slots masked, then the O slots (prefix, then tail) with the causal mask
  `slot <= N - Q + i`.
- With one split the program merges the groups itself (LSE_C, LSE_O, sigmoid weight in float32) and
  writes the output. For decoding (few rows, long caches) the slots of each group are divided among
  `splits` programs (flash-decoding); each writes its partial statistics and a small torch step
  combines the splits, then applies the same merge.
"""

from __future__ import annotations

from typing import Any

import torch

from kvrag.kernels._triton import (
    HAS_TRITON,
    cpu_time_ms,
    jit,
    launchable,
    next_pow2,
    pick_backend,
    tl,
    triton,
)

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------- kernel


@jit
def _ape_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,  # (B, C) int8, 1 = real passage slot (unused unless HAS_VALID)
    o_ptr,  # (B, H, Q, D) output (unused when SPLIT)
    stats_ptr,  # (B, H, Q, splits, 4) float32: m_c, l_c, m_o, l_o (only when SPLIT)
    acc_ptr,  # (B, H, Q, splits, 2, D) float32: unnormalised outputs of C and O (only when SPLIT)
    q_len,
    n_keys,
    c_start,
    c_end,
    rep,
    n_kv_heads,
    head_dim,
    n_splits,
    qk_c,  # scaling / T * log2(e): passage scores in base 2
    qk_o,  # scaling * log2(e)
    st,  # S * T
    blocks_c,  # passage tiles per split
    blocks_o,  # O tiles per split
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_valid,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    HAS_VALID: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else None (default)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rep * q_len
    head = kvh * rep + rows // q_len
    tok = rows % q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    arange_n = tl.arange(0, BLOCK_N)

    q_rows = b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + tok.to(tl.int64) * stride_qm
    q = tl.load(
        q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    # Group C: passage slots, all visible, scores / T, padding masked. Running maxima start finite
    # (-1e30), so a fully masked tile gives exp2(-inf) = 0 rather than NaN.
    m_c = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_c = tl.zeros([BLOCK_M], tl.float32)
    acc_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    c_lo = c_start + split * blocks_c * BLOCK_N
    c_hi = tl.minimum(c_lo + blocks_c * BLOCK_N, c_end)
    for blk in range(blocks_c):
        slots = c_lo + blk * BLOCK_N + arange_n
        ok = slots < c_hi
        if HAS_VALID:
            flag = tl.load(valid_ptr + b.to(tl.int64) * stride_valid + (slots - c_start), mask=ok, other=0)
            ok = ok & (flag != 0)
        kt = tl.load(
            k_base + slots.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = tl.where(ok[None, :], s * qk_c, float("-inf"))
        m_new = tl.maximum(m_c, tl.max(s, axis=1))
        alpha = tl.exp2(m_c - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_c = l_c * alpha + tl.sum(p, axis=1)
        vt = tl.load(
            v_base + slots.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc_c = acc_c * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_c = m_new

    # Group O: prefix then tail, one index space o -> slot (o, or o + C past the prefix), causal.
    c_len = c_end - c_start
    o_total = n_keys - c_len
    last = n_keys - q_len + tok  # the cache slot of each row's own token
    m_o = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_o = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o_lo = split * blocks_o * BLOCK_N
    o_hi = tl.minimum(o_lo + blocks_o * BLOCK_N, o_total)
    for blk in range(blocks_o):
        o = o_lo + blk * BLOCK_N + arange_n
        ok = o < o_hi
        slots = tl.where(o < c_start, o, o + c_len)
        kt = tl.load(
            k_base + slots.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        seen = ok[None, :] & (slots[None, :] <= last[:, None])
        s = tl.where(seen, s * qk_o, float("-inf"))
        m_new = tl.maximum(m_o, tl.max(s, axis=1))
        alpha = tl.exp2(m_o - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_o = l_o * alpha + tl.sum(p, axis=1)
        vt = tl.load(
            v_base + slots.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_o = m_new

    flat = (b.to(tl.int64) * (n_kv_heads * rep) + head) * q_len + tok  # row of (B, H, Q)
    if SPLIT:
        st_ptrs = stats_ptr + (flat * n_splits + split) * 4
        tl.store(st_ptrs + 0, m_c, mask=row_ok)
        tl.store(st_ptrs + 1, l_c, mask=row_ok)
        tl.store(st_ptrs + 2, m_o, mask=row_ok)
        tl.store(st_ptrs + 3, l_o, mask=row_ok)
        acc_rows = ((flat * n_splits + split) * 2) * head_dim
        mask2 = row_ok[:, None] & d_ok[None, :]
        tl.store(acc_ptr + acc_rows[:, None] + offs_d[None, :], acc_c, mask=mask2)
        tl.store(acc_ptr + acc_rows[:, None] + head_dim + offs_d[None, :], acc_o, mask=mask2)
    else:
        # softmax([S*T*LSE_C, LSE_O]) in float32; an empty passage group (none, or all padded) gets 0.
        has_c = l_c > 0
        lse_c = (m_c + tl.log2(tl.where(has_c, l_c, 1.0))) * 0.6931471805599453
        lse_o = (m_o + tl.log2(l_o)) * 0.6931471805599453
        # sigmoid(S*T*LSE_C - LSE_O), its argument clamped where the weight is 0 or 1 in float32 anyway
        x = tl.where(has_c, st * lse_c - lse_o, 0.0)
        x = tl.minimum(tl.maximum(x, -80.0), 80.0)
        w_c = tl.where(has_c, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        out_c = acc_c / tl.where(has_c, l_c, 1.0)[:, None]
        out_o = acc_o / l_o[:, None]
        out = w_c[:, None] * out_c + (1.0 - w_c)[:, None] * out_o
        o_rows = b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + tok.to(tl.int64) * stride_om
        tl.store(
            o_ptr + o_rows[:, None] + offs_d[None, :] * stride_od,
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


# ---------------------------------------------------------------------------------------- reference


def ape_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    c_start: int,
    c_end: int,
    temperature: float,
    scale: float,
    scaling: float,
    c_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference APE attention. query (B, H, Q, D); key/value (B, Hkv, N, D) with H a multiple of
    Hkv (grouped-query attention). The last Q cache slots are the query tokens themselves. Returns
    (B, H, Q, D) in the query's dtype; all softmax statistics are computed in float32."""
    b, h, q_len, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if not 0 <= c_start <= c_end <= n - q_len:
        raise ValueError(
            f"passage slots [{c_start}, {c_end}) do not fit a cache of {n} with {q_len} new tokens"
        )
    rep = h // hkv
    # Group query heads by their KV head instead of repeating K and V.
    qf = query.float().reshape(b, hkv, rep * q_len, d)
    kf, vf = key.float(), value.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scaling  # (B, Hkv, rep*Q, N)

    # O group: prefix slots and the tail (query + generated), causal over the tail.
    tail = n - c_end
    s_o = torch.cat([scores[..., :c_start], scores[..., c_end:]], dim=-1)
    v_o = torch.cat([vf[:, :, :c_start], vf[:, :, c_end:]], dim=2)
    q_pos = torch.arange(q_len, device=query.device) + (tail - q_len)  # index of each query in the tail
    k_pos = torch.arange(tail, device=query.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Q, tail)
    allowed = torch.cat([causal.new_ones(q_len, c_start), causal], dim=1).repeat(rep, 1)
    s_o = s_o.masked_fill(~allowed, float("-inf"))
    lse_o = torch.logsumexp(s_o, dim=-1, keepdim=True)
    out_o = torch.matmul(torch.exp(s_o - lse_o), v_o)

    if c_end == c_start:
        return out_o.reshape(b, h, q_len, d).to(query.dtype)

    s_c = scores[..., c_start:c_end] / temperature
    if c_valid is not None:
        s_c = s_c.masked_fill(~c_valid[:, None, None, :].to(torch.bool), float("-inf"))
    lse_c = torch.logsumexp(s_c, dim=-1, keepdim=True)
    safe_c = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    out_c = torch.matmul(torch.exp(s_c - safe_c), vf[:, :, c_start:c_end])

    # softmax([S*T*LSE_C, LSE_O]); an empty (fully padded) passage group gets weight 0.
    a = scale * temperature * lse_c
    w_c = torch.sigmoid(a - lse_o)
    w_c = torch.where(torch.isfinite(lse_c), w_c, torch.zeros_like(w_c))
    out = w_c * out_c + (1.0 - w_c) * out_o
    return out.reshape(b, h, q_len, d).to(query.dtype)


# ----------------------------------------------------------------------------------------- launcher


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, c_start: int, c_end: int) -> None:
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(
            f"query must be (B, H, Q, D) and key/value (B, Hkv, N, D); got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, h, q_len, d = query.shape
    if key.shape[0] != b or key.shape[3] != d:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head_dim"
        )
    hkv, n = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if not 0 <= c_start <= c_end <= n - q_len:
        raise ValueError(
            f"passage slots [{c_start}, {c_end}) do not fit a cache of {n} with {q_len} new tokens"
        )


def _merge(
    m_c: torch.Tensor,
    l_c: torch.Tensor,
    acc_c: torch.Tensor,
    m_o: torch.Tensor,
    l_o: torch.Tensor,
    acc_o: torch.Tensor,
    st: float,
) -> torch.Tensor:
    """The kernel's final merge in torch, for split runs: base-2 maxima m, sums l, accumulators acc."""
    has_c = l_c > 0
    lse_c = (m_c + torch.log2(torch.where(has_c, l_c, 1.0))) * _LN2
    lse_o = (m_o + torch.log2(l_o)) * _LN2
    w_c = torch.where(has_c, torch.sigmoid(st * lse_c - lse_o), 0.0)
    out_c = acc_c / torch.where(has_c, l_c, 1.0)[..., None]
    return w_c[..., None] * out_c + (1.0 - w_c)[..., None] * (acc_o / l_o[..., None])


def ape_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    c_start: int,
    c_end: int,
    temperature: float,
    scale: float,
    scaling: float,
    c_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Same contract
    as `ape_attention_torch`. `block_m`, `block_n` (powers of two >= 16) and `splits` (programs that
    share each row block's cache slots; default: enough to fill the GPU) are tuning knobs."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton ape_attention kernel needs the triton package")
    _check(query, key, value, c_start, c_end)
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise ValueError(
            f"query, key and value must share one of fp16/bf16/fp32, got {query.dtype}, {key.dtype}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, h, q_len, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    rep = h // hkv
    c_len = c_end - c_start
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out

    has_valid = c_valid is not None and c_len > 0
    if has_valid:
        if c_valid.dim() != 2 or c_valid.shape[1] != c_len or c_valid.shape[0] not in (1, b):
            raise ValueError(f"c_valid must be ({b}, {c_len}), got {tuple(c_valid.shape)}")
        valid = c_valid.to(device=query.device, dtype=torch.int8).contiguous()
        stride_valid = valid.stride(0) if valid.shape[0] == b and b > 1 else 0
    else:
        valid = torch.empty(1, dtype=torch.int8, device=query.device)
        stride_valid = 0

    block_d = max(16, next_pow2(d))
    rows = rep * q_len
    # Tile sizes that keep shared memory under ~100 KB (consumer GPUs included): float32 tiles take
    # twice the room of half ones, head_dim 256 twice that of 128.
    fp32, wide = query.dtype == torch.float32, block_d > 128
    block_m = block_m or (16 if rows <= 16 or (fp32 and wide) else 32 if fp32 else 64)
    block_n = block_n or (16 if fp32 and wide else 32 if fp32 or wide else 64)
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    row_blocks = triton.cdiv(rows, block_m)
    o_total = n - c_len
    tiles_c, tiles_o = triton.cdiv(c_len, block_n), triton.cdiv(o_total, block_n)
    if splits is None:
        splits = 1
        programs = row_blocks * b * hkv
        if query.is_cuda:
            sms = torch.cuda.get_device_properties(query.device).multi_processor_count
            if programs < sms:
                splits = min(triton.cdiv(2 * sms, programs), max(1, (tiles_c + tiles_o) // 4))
    splits = max(1, min(int(splits), max(tiles_c, tiles_o)))
    blocks_c, blocks_o = triton.cdiv(tiles_c, splits), triton.cdiv(tiles_o, splits)
    split = splits > 1
    if split:
        stats = torch.empty((b, h, q_len, splits, 4), dtype=torch.float32, device=query.device)
        accs = torch.empty((b, h, q_len, splits, 2, d), dtype=torch.float32, device=query.device)
    else:
        stats = accs = torch.empty(1, dtype=torch.float32, device=query.device)

    launchable(_ape_attention_kernel)[(row_blocks, b * hkv, splits)](
        query,
        key,
        value,
        valid,
        out,
        stats,
        accs,
        q_len,
        n,
        c_start,
        c_end,
        rep,
        hkv,
        d,
        splits,
        scaling / temperature * _LOG2E,
        scaling * _LOG2E,
        scale * temperature,
        blocks_c,
        blocks_o,
        *query.stride(),
        *key.stride(),
        *value.stride(),
        stride_valid,
        *out.stride(),
        HAS_VALID=has_valid,
        SPLIT=split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    if not split:
        return out
    # Combine the splits of each group (log-sum-exp in base 2), then merge the groups.
    m_part, l_part = stats[..., 0::2], stats[..., 1::2]  # (B, H, Q, splits, 2): group C, group O
    top = m_part.amax(dim=3, keepdim=True)
    w = torch.exp2(m_part - top)
    l_sum = (l_part * w).sum(dim=3)
    acc = (accs * w[..., None]).sum(dim=3)  # (B, H, Q, 2, D)
    top = top.squeeze(3)
    res = _merge(
        top[..., 0],
        l_sum[..., 0],
        acc[..., 0, :],
        top[..., 1],
        l_sum[..., 1],
        acc[..., 1, :],
        scale * temperature,
    )
    return out.copy_(res)


def _triton_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        return False
    if query.shape[-1] > 256:
        return False
    # The kernel has no backward pass.
    return not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))


def ape_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    c_start: int,
    c_end: int,
    temperature: float,
    scale: float,
    scaling: float,
    c_valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatcher. `backend="auto"`: the Triton kernel for CUDA tensors it supports (fp16/bf16/fp32,
    head_dim <= 256, no autograd), the torch reference otherwise (CPU included). "torch" and "triton"
    force one (Triton on CPU tensors needs TRITON_INTERPRET=1)."""
    kwargs = dict(
        c_start=c_start,
        c_end=c_end,
        temperature=temperature,
        scale=scale,
        scaling=scaling,
        c_valid=c_valid,
    )
    chosen = pick_backend(backend, (query, key, value))
    if chosen == "triton" and (backend == "triton" or _triton_supports(query, key, value)):
        return ape_attention_triton(query, key, value, **kwargs)
    return ape_attention_torch(query, key, value, **kwargs)


# ---------------------------------------------------------------------------------------- benchmark


def _bench_inputs(
    b: int, h: int, hkv: int, n: int, q_len: int, d: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, q_len, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def benchmark(*, quick: bool = False) -> dict[str, Any]:
    """Triton against the torch reference at an 8K-token cache (GQA 32/8 heads, head_dim 128, bf16,
    T = S = 0.9): the question prefill (64 new tokens) and one decoding step. Without a CUDA GPU: the
    reference alone on a 4K-token cache in float32 (9 heads over 3 KV heads, 16 new tokens)."""
    t, s = 0.9, 0.9
    if not (HAS_TRITON and torch.cuda.is_available()):
        n, q_len, d = (256, 8, 64) if quick else (4096, 16, 64)
        q, k, v = _bench_inputs(1, 9, 3, n, q_len, d, torch.float32, "cpu")
        c0, c1 = 32, n - q_len - 8
        ms = cpu_time_ms(
            lambda: ape_attention_torch(
                q, k, v, c_start=c0, c_end=c1, temperature=t, scale=s, scaling=d**-0.5
            )
        )
        return {
            "cache_tokens": n,
            "new_tokens": q_len,
            "heads": 9,
            "kv_heads": 3,
            "head_dim": d,
            "dtype": "float32",
            "torch_ms": round(ms, 3),
        }

    from triton.testing import do_bench

    out: dict[str, Any] = {
        "cache_tokens": 8192,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "dtype": "bfloat16",
    }
    for name, q_len in (("prefill_64", 64), ("decode_1", 1)):
        n = 8192
        q, k, v = _bench_inputs(1, 32, 8, n, q_len, 128, torch.bfloat16, "cuda")
        c0, c1 = 64, n - q_len - 64
        kw = dict(c_start=c0, c_end=c1, temperature=t, scale=s, scaling=128**-0.5)
        tri = ape_attention_triton(q, k, v, **kw)
        ref = ape_attention_torch(q, k, v, **kw)
        err = (tri.float() - ref.float()).abs().max().item()
        t_ms = do_bench(lambda q=q, k=k, v=v, kw=kw: ape_attention_triton(q, k, v, **kw))
        r_ms = do_bench(lambda q=q, k=k, v=v, kw=kw: ape_attention_torch(q, k, v, **kw))
        out[name] = {
            "new_tokens": q_len,
            "triton_ms": round(t_ms, 4),
            "torch_ms": round(r_ms, 4),
            "speedup_vs_torch": round(r_ms / t_ms, 2),
            "max_abs_diff": round(err, 5),
        }
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(benchmark(), indent=2))
