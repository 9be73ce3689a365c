"""int8 KV dequantisation: the torch reference against a naive per-element loop and the codec's own
reference, the Triton kernel against the reference (interpreter on CPU, the GPU when present), and
the codec's decode through it."""

from __future__ import annotations

import pytest
import torch

from kvrag.kernels.kv_dequant import kv_dequant, kv_dequant_torch, kv_dequant_triton
from kvrag.rag.kvcache.codec import _quantize, decode_kv, encode_kv


def _quantized(layers=2, heads=3, tokens=13, head_dim=24, seed=0):
    """Codes, scales and mins as the codec makes them (keys per channel, values per token)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, heads, tokens, head_dim, generator=g) * 3
    values = torch.randn(layers, heads, tokens, head_dim, generator=g)
    kq, ks, km = _quantize(keys, dim=2)
    vq, vs, vm = _quantize(values, dim=3)
    return (kq, ks, km, vq, vs, vm), keys, values


def _naive(kq, ks, km, vq, vs, vm):
    """One element at a time, in float64: key[l,h,t,d] = kq * ks[l,h,d] + km[l,h,d]; value[l,h,t,d] =
    vq * vs[l,h,t] + vm[l,h,t]."""
    layers, heads, tokens, head_dim = kq.shape
    keys = torch.empty(kq.shape, dtype=torch.float64)
    values = torch.empty(kq.shape, dtype=torch.float64)
    for l_ in range(layers):
        for h in range(heads):
            for t in range(tokens):
                for d in range(head_dim):
                    keys[l_, h, t, d] = int(kq[l_, h, t, d]) * float(ks[l_, h, d]) + float(km[l_, h, d])
                    values[l_, h, t, d] = int(vq[l_, h, t, d]) * float(vs[l_, h, t]) + float(vm[l_, h, t])
    return keys, values


def test_reference_matches_naive():
    parts, keys, values = _quantized(2, 2, 5, 6)
    want_k, want_v = _naive(*parts)
    got_k, got_v = kv_dequant_torch(*parts)
    assert torch.allclose(got_k.double(), want_k, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_v.double(), want_v, rtol=1e-6, atol=1e-6)
    # ... within one quantisation step of the original tensors; casts to the requested dtype.
    assert (got_k - keys).abs().max() <= parts[1].float().max() / 2 + 1e-3
    assert (got_v - values).abs().max() <= parts[4].float().max() / 2 + 1e-3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for a, b in zip(kv_dequant_torch(*parts, dtype), (got_k, got_v), strict=True):
            assert a.dtype == dtype and torch.equal(a, b.to(dtype))


def _tol(dtype):
    # The interpreter rounds float32 -> bfloat16 differently from torch: allow one bf16 step.
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "block_t"), [((2, 3, 13, 24), 4), ((1, 2, 1, 8), None), ((3, 1, 40, 16), 16)]
)
def test_triton_matches_reference(kernel_device, dtype, shape, block_t):
    parts, _, _ = _quantized(*shape)
    want = kv_dequant_torch(*parts, dtype)
    got = kv_dequant_triton(*(p.to(kernel_device) for p in parts), dtype, block_t=block_t)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a.cpu(), b, rtol=_tol(dtype), atol=_tol(dtype))


def test_triton_writes_into_a_slice_of_a_larger_cache(kernel_device):
    parts, _, _ = _quantized(2, 3, 11, 24)
    cache_k = torch.full((2, 3, 30, 24), 7.0, dtype=torch.float16, device=kernel_device)
    cache_v = torch.full((2, 3, 30, 24), 7.0, dtype=torch.float32, device=kernel_device)  # dtypes may differ
    out = (cache_k[:, :, 5:16], cache_v[:, :, 5:16])
    ret = kv_dequant(*(p.to(kernel_device) for p in parts), out=out, backend="triton")
    assert ret[0].data_ptr() == cache_k[:, :, 5:16].data_ptr()
    want_k, want_v = kv_dequant_torch(*parts)
    torch.testing.assert_close(cache_k[:, :, 5:16].cpu(), want_k.half(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cache_v[:, :, 5:16].cpu(), want_v, rtol=1e-6, atol=1e-6)
    untouched = torch.cat([cache_k[:, :, :5], cache_k[:, :, 16:]], dim=2)
    assert (untouched == 7.0).all() and (cache_v[:, :, :5] == 7.0).all() and (cache_v[:, :, 16:] == 7.0).all()


def test_triton_empty_and_errors(kernel_device):
    parts, _, _ = _quantized(1, 2, 0, 8)
    k, v = kv_dequant_triton(*(p.to(kernel_device) for p in parts), torch.float16)
    assert k.shape == (1, 2, 0, 8) and v.dtype == torch.float16
    parts, _, _ = _quantized(1, 2, 3, 8)
    with pytest.raises(ValueError, match="kscale"):
        kv_dequant(parts[0], parts[1][:, :, :4], *parts[2:])
    with pytest.raises(ValueError, match="uint8"):
        kv_dequant(parts[0].float(), *parts[1:])


def test_dispatcher_on_cpu_equals_decode_kv(monkeypatch, no_interpreter):
    import kvrag.kernels.kv_dequant as mod

    def boom(*a, **k):
        raise AssertionError("the Triton launcher must not run for CPU tensors")

    monkeypatch.setattr(mod, "kv_dequant_triton", boom)
    parts, keys, values = _quantized(2, 3, 9, 16)
    # the independent answer: the per-element float64 loop, rounded once to float16
    want_k, want_v = (t.to(torch.float16) for t in _naive(*parts))
    got_k, got_v = kv_dequant(*parts, torch.float16)
    assert got_k.dtype == torch.float16 and torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    out = (torch.empty_like(want_k), torch.empty_like(want_v))
    kv_dequant(*parts, out=out)
    assert torch.equal(out[0], want_k) and torch.equal(out[1], want_v)
    # the codec's own decode of the same tensors lands on the same values (through its own blob)
    ref_k, ref_v = decode_kv(encode_kv(keys, values, codec="int8"), dtype=torch.float16)
    torch.testing.assert_close(ref_k, want_k, rtol=0, atol=1e-2)
    torch.testing.assert_close(ref_v, want_v, rtol=0, atol=1e-2)
    assert not torch.equal(got_k, keys.to(torch.float16))  # int8 is lossy: this checks decoding, not a copy


def test_decode_kv_into_gpu_cache_uses_the_kernel():
    if not torch.cuda.is_available():
        pytest.skip("decode_kv dequantises on the GPU only when its destination is a CUDA tensor")
    _, keys, values = _quantized(2, 3, 9, 16)
    blob = encode_kv(keys, values, codec="int8")
    ref_k, ref_v = decode_kv(blob, dtype=torch.float16)
    cache = torch.zeros((2, 2, 3, 20, 16), dtype=torch.float16, device="cuda")
    decode_kv(blob, out=(cache[0, :, :, 4:13], cache[1, :, :, 4:13]))
    torch.testing.assert_close(cache[0, :, :, 4:13].cpu(), ref_k, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cache[1, :, :, 4:13].cpu(), ref_v, rtol=1e-3, atol=1e-3)
    assert (cache[:, :, :, :4] == 0).all() and (cache[:, :, :, 13:] == 0).all()
