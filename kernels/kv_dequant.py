"""int8 KV-cache dequantisation fused into one pass, writing straight into the attention layout.

The int8 codec (`rag/kvcache/codec.py`) stores, per passage, uint8 key and value codes of shape
(layers, kv_heads, tokens, head_dim) with asymmetric min/scale pairs in float16: keys per channel
(scale and min of shape (layers, kv_heads, head_dim), shared by all tokens) and values per token
(shape (layers, kv_heads, tokens), shared by all channels). Reconstruction is `code * scale + min`,
computed in float32 and cast to the destination dtype (fp32, fp16 or bf16).

Triton kernel: grid (token blocks, layers * kv_heads). Each program reads a BLOCK_T x head_dim tile of
key codes and of value codes, the head's key scales/mins once (one row, broadcast over tokens) and
the tile's value scales/mins (one column, broadcast over channels), and stores both tiles in the
output dtype through arbitrary output strides, so it can fill a slice of a larger preallocated cache
(e.g. one passage's token range) with no intermediate tensor. Only the compressed bytes need to
cross to the GPU.
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
from kvrag.kernels.kv_reference import dequantize_int8_reference

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------- kernel


@jit
def _kv_dequant_kernel(
    kq_ptr,  # (L, H, T, D) uint8 key codes, contiguous
    vq_ptr,  # (L, H, T, D) uint8 value codes, contiguous
    ks_ptr,  # (L, H, D) key scales, contiguous
    km_ptr,  # (L, H, D) key mins
    vs_ptr,  # (L, H, T) value scales
    vm_ptr,  # (L, H, T) value mins
    ko_ptr,  # keys out (L, H, T, D), any strides
    vo_ptr,  # values out
    heads,
    tokens,
    head_dim,
    stride_kol,
    stride_koh,
    stride_kot,
    stride_kod,
    stride_vol,
    stride_voh,
    stride_vot,
    stride_vod,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    lh = tl.program_id(1).to(tl.int64)
    layer = lh // heads
    head = lh % heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < tokens
    d_ok = offs_d < head_dim
    mask = t_ok[:, None] & d_ok[None, :]

    src = (lh * tokens + offs_t.to(tl.int64))[:, None] * head_dim + offs_d[None, :]
    k_scale = tl.load(ks_ptr + lh * head_dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_min = tl.load(km_ptr + lh * head_dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    v_scale = tl.load(vs_ptr + lh * tokens + offs_t, mask=t_ok, other=0.0).to(tl.float32)
    v_min = tl.load(vm_ptr + lh * tokens + offs_t, mask=t_ok, other=0.0).to(tl.float32)

    kq = tl.load(kq_ptr + src, mask=mask, other=0).to(tl.float32)
    keys = kq * k_scale[None, :] + k_min[None, :]
    k_dst = ko_ptr + layer * stride_kol + head * stride_koh
    k_dst += offs_t.to(tl.int64)[:, None] * stride_kot + offs_d[None, :] * stride_kod
    tl.store(k_dst, keys.to(ko_ptr.dtype.element_ty), mask=mask)

    vq = tl.load(vq_ptr + src, mask=mask, other=0).to(tl.float32)
    values = vq * v_scale[:, None] + v_min[:, None]
    v_dst = vo_ptr + layer * stride_vol + head * stride_voh
    v_dst += offs_t.to(tl.int64)[:, None] * stride_vot + offs_d[None, :] * stride_vod
    tl.store(v_dst, values.to(vo_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- reference


# The reference is the codec's own reconstruction (float32 `min + code * scale`, then a cast): the
# format belongs to the codec, and one reference means the kernel is checked against what the CPU uses.
kv_dequant_torch = dequantize_int8_reference


# ----------------------------------------------------------------------------------------- launcher


def _check(
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kmin: torch.Tensor,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vmin: torch.Tensor,
) -> tuple[int, int, int, int]:
    if kq.dim() != 4 or kq.shape != vq.shape or kq.dtype != torch.uint8 or vq.dtype != torch.uint8:
        raise ValueError(
            f"codes must be uint8 (layers, kv_heads, tokens, head_dim), got {tuple(kq.shape)} {kq.dtype} "
            f"and {tuple(vq.shape)} {vq.dtype}"
        )
    layers, heads, tokens, head_dim = kq.shape
    for name, t, shape in (
        ("kscale", kscale, (layers, heads, head_dim)),
        ("kmin", kmin, (layers, heads, head_dim)),
        ("vscale", vscale, (layers, heads, tokens)),
        ("vmin", vmin, (layers, heads, tokens)),
    ):
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a float tensor of shape {shape}, got {tuple(t.shape)} {t.dtype}"
            )
    return layers, heads, tokens, head_dim


def kv_dequant_triton(
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kmin: torch.Tensor,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vmin: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Writes into
    `out=(keys, values)` (any strides, e.g. a token slice of a larger cache; their dtypes win over
    `dtype`) or into new contiguous tensors."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kv_dequant kernel needs the triton package")
    layers, heads, tokens, head_dim = _check(kq, kscale, kmin, vq, vscale, vmin)
    shape = (layers, heads, tokens, head_dim)
    if out is None:
        if dtype not in OUT_DTYPES:
            raise ValueError(f"dtype must be one of fp32/fp16/bf16, got {dtype}")
        out = (
            torch.empty(shape, dtype=dtype, device=kq.device),
            torch.empty(shape, dtype=dtype, device=kq.device),
        )
    for t in out:
        if tuple(t.shape) != shape or t.dtype not in OUT_DTYPES or t.device != kq.device:
            raise ValueError(
                f"out tensors must be fp32/fp16/bf16 {shape} on {kq.device}, got {tuple(t.shape)}"
            )
    if kq.numel() == 0:
        return out
    block_d = next_pow2(head_dim)
    block_t = block_t or max(1, min(64, 4096 // block_d))
    if block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    ins = [t.contiguous() for t in (kq, vq, kscale, kmin, vscale, vmin)]
    ko, vo = out
    launchable(_kv_dequant_kernel)[(triton.cdiv(tokens, block_t), layers * heads)](
        *ins,
        ko,
        vo,
        heads,
        tokens,
        head_dim,
        *ko.stride(),
        *vo.stride(),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return out


def kv_dequant(
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kmin: torch.Tensor,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vmin: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise int8 KV codes to (keys, values), each (layers, kv_heads, tokens, head_dim), in `dtype`
    or into `out`. `backend="auto"` runs Triton when the codes (and `out`) are on CUDA and the torch
    reference otherwise; "torch" / "triton" force one."""
    _check(kq, kscale, kmin, vq, vscale, vmin)
    tensors = (kq, kscale, kmin, vq, vscale, vmin, *(out or ()))
    if pick_backend(backend, tensors) == "triton":
        return kv_dequant_triton(kq, kscale, kmin, vq, vscale, vmin, dtype, out=out)
    if out is None:
        return kv_dequant_torch(kq, kscale, kmin, vq, vscale, vmin, dtype)
    keys, values = kv_dequant_torch(kq, kscale, kmin, vq, vscale, vmin)
    out[0].copy_(keys)
    out[1].copy_(values)
    return out


# ---------------------------------------------------------------------------------------- benchmark


def _inputs(layers: int, heads: int, tokens: int, head_dim: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    kq = torch.randint(0, 256, (layers, heads, tokens, head_dim), dtype=torch.uint8, generator=g)
    vq = torch.randint(0, 256, (layers, heads, tokens, head_dim), dtype=torch.uint8, generator=g)
    ks = (torch.rand(layers, heads, head_dim, generator=g) / 64).half()
    km = (torch.randn(layers, heads, head_dim, generator=g)).half()
    vs = (torch.rand(layers, heads, tokens, generator=g) / 64).half()
    vm = (torch.randn(layers, heads, tokens, generator=g)).half()
    return tuple(t.to(device) for t in (kq, ks, km, vq, vs, vm))


def _bytes_moved(layers: int, heads: int, tokens: int, head_dim: int, out_bytes: int) -> int:
    n = layers * heads * tokens * head_dim
    return 2 * n * (1 + out_bytes) + 2 * 2 * layers * heads * (head_dim + tokens)


def benchmark(*, quick: bool = False) -> dict[str, Any]:
    """Triton against the torch reference on a 2,048-token cache of a Llama-3-8B-like model (32 layers,
    8 KV heads, head_dim 128) to fp16, with the achieved GB/s (codes and scales read, fp16 written).
    Without a CUDA GPU: the reference alone on SmolLM2-135M's shape (30 layers, 3 KV heads, 64) to
    fp32."""
    if not (HAS_TRITON and torch.cuda.is_available()):
        shape = (30, 3, 64 if quick else 512, 64)
        args = _inputs(*shape, "cpu")
        ms = cpu_time_ms(lambda: kv_dequant_torch(*args, torch.float32))
        moved = _bytes_moved(*shape, 4)
        return {
            "shape": list(shape),
            "out_dtype": "float32",
            "torch_ms": round(ms, 3),
            "torch_gb_per_s": round(moved / (ms / 1000) / 1e9, 2),
        }

    from triton.testing import do_bench

    from kvrag.kernels._triton import gpu_peak_bandwidth_gbs

    shape = (32, 8, 2048, 128)
    args = _inputs(*shape, "cuda")
    tri = kv_dequant_triton(*args, torch.float16)
    ref = kv_dequant_torch(*args, torch.float16)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(tri, ref, strict=True))
    t_ms = do_bench(lambda: kv_dequant_triton(*args, torch.float16))
    r_ms = do_bench(lambda: kv_dequant_torch(*args, torch.float16))
    moved = _bytes_moved(*shape, 2)
    gbs = moved / (t_ms / 1000) / 1e9
    peak = gpu_peak_bandwidth_gbs()
    return {
        "shape": list(shape),
        "out_dtype": "float16",
        "triton_ms": round(t_ms, 4),
        "torch_ms": round(r_ms, 4),
        "speedup_vs_torch": round(r_ms / t_ms, 2),
        "max_abs_diff": err,
        "triton_gb_per_s": round(gbs, 1),
        "torch_gb_per_s": round(moved / (r_ms / 1000) / 1e9, 1),
        "pct_of_peak_bandwidth": round(100 * gbs / peak, 1) if peak else None,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(benchmark(), indent=2))
