"""The KV-cache blob codec: round trips, int8 error bounds and sizes, and corruption detection."""

from __future__ import annotations

import json
import random
import struct
import time
import zlib

import numpy as np
import pytest
import torch

from kvrag.errors import InvalidInputError, KvragError
from kvrag.rag.kvcache import (
    CODECS,
    CorruptBlobError,
    blob_info,
    decode_kv,
    dequantize_int8_reference,
    encode_kv,
    kv_nbytes,
)

GQA = (30, 3, 150, 64)


def make_kv(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5 + 0.1


def split_blob(blob: bytes) -> tuple[dict, int]:
    """(header, payload offset), parsed independently of the codec module."""
    magic, version, hlen = struct.unpack_from("<4sBI", blob, 0)
    assert magic == b"KVRC" and version == 1
    return json.loads(blob[9 : 9 + hlen]), 9 + hlen


def int8_sections(blob: bytes) -> dict[str, np.ndarray]:
    """The six int8-codec arrays of a blob, read with numpy straight from the documented layout."""
    h, off = split_blob(blob)
    assert h["codec"] == "int8"
    L, H, T, D = h["layers"], h["kv_heads"], h["tokens"], h["head_dim"]
    out = {}
    for name, dtype, shape in (
        ("kq", "u1", (L, H, T, D)),
        ("vq", "u1", (L, H, T, D)),
        ("kscale", "<f2", (L, H, D)),
        ("kmin", "<f2", (L, H, D)),
        ("vscale", "<f2", (L, H, T)),
        ("vmin", "<f2", (L, H, T)),
    ):
        n = int(np.prod(shape))
        arr = np.frombuffer(blob, dtype=dtype, count=n, offset=off).reshape(shape)
        out[name] = arr
        off += arr.nbytes
    assert off == len(blob)
    return out


def rewrite_header(blob: bytes, **changes) -> bytes:
    """The blob with header fields replaced (CRC untouched unless given)."""
    h, off = split_blob(blob)
    h.update(changes)
    raw = json.dumps(h).encode()
    return b"KVRC\x01" + struct.pack("<I", len(raw)) + raw + blob[off:]


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "shape", [(30, 3, 1, 64), (30, 3, 7, 64), (30, 3, 0, 64), (2, 4, 33, 16), (1, 1, 1, 1)]
)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_shapes(codec: str, shape: tuple[int, ...]) -> None:
    k, v = make_kv(shape, seed=sum(shape))
    blob = encode_kv(k, v, codec=codec, digest="d1")
    k2, v2 = decode_kv(blob, expect_digest="d1")
    assert k2.shape == v2.shape == shape
    assert k2.dtype == v2.dtype == torch.float32
    assert k2.is_contiguous() and v2.is_contiguous()
    if codec == "fp32":
        assert torch.equal(k2, k) and torch.equal(v2, v)
    elif codec == "fp16":
        assert torch.equal(k2, k.half().float()) and torch.equal(v2, v.half().float())
        torch.testing.assert_close(k2, k, atol=2e-3, rtol=1e-3)
    elif codec == "bf16":
        assert torch.equal(k2, k.bfloat16().float()) and torch.equal(v2, v.bfloat16().float())
    else:
        if shape[2]:
            k_range = k.amax(dim=2) - k.amin(dim=2)  # (L, H, D)
            v_range = v.amax(dim=3) - v.amin(dim=3)  # (L, H, T)
            assert ((k2 - k).abs() <= k_range.unsqueeze(2) / 255 + 1e-3).all()
            assert ((v2 - v).abs() <= v_range.unsqueeze(3) / 255 + 1e-3).all()
    info = blob_info(blob)
    assert info["codec"] == codec and info["digest"] == "d1" and info["nbytes"] == len(blob)
    assert (info["layers"], info["kv_heads"], info["tokens"], info["head_dim"]) == shape
    assert info["payload_len"] == kv_nbytes(*shape, codec)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_and_input_dtypes(codec: str, dtype: torch.dtype) -> None:
    k, v = make_kv((2, 2, 9, 8))
    blob = encode_kv(k.to(dtype), v.to(dtype), codec=codec)
    k2, v2 = decode_kv(blob, dtype=dtype)
    assert k2.dtype == v2.dtype == dtype and k2.is_contiguous()
    torch.testing.assert_close(k2.float(), k.to(dtype).float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(v2.float(), v.to(dtype).float(), atol=0.05, rtol=0.02)


def test_decoded_tensors_own_their_memory() -> None:
    k, v = make_kv((2, 2, 5, 8))
    blob = bytearray(encode_kv(k, v, codec="fp16"))
    k2, _ = decode_kv(blob, dtype=torch.float16)
    before = k2.clone()
    blob[-100:] = bytes(100)  # the decoded tensors must not alias the blob
    assert torch.equal(k2, before)
    k2.add_(1)  # and they are writable


def test_buffer_types_and_unaligned_views() -> None:
    k, v = make_kv((3, 2, 11, 8))
    for codec in CODECS:
        blob = encode_kv(k, v, codec=codec)
        ref = decode_kv(blob)
        holder = bytearray(b"x" + blob + b"yy")
        for buf in (bytearray(blob), memoryview(blob), memoryview(holder)[1:-2]):
            got = decode_kv(buf)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_int8_error_bounds_against_stored_scales() -> None:
    k, v = make_kv(GQA, seed=3)
    blob = encode_kv(k, v, codec="int8")
    k2, v2 = decode_kv(blob)
    s = int8_sections(blob)
    kscale = torch.from_numpy(s["kscale"].astype(np.float32)).unsqueeze(2)
    vscale = torch.from_numpy(s["vscale"].astype(np.float32)).unsqueeze(3)
    assert ((k2 - k).abs() <= kscale / 2 + 1e-5).all()
    assert ((v2 - v).abs() <= vscale / 2 + 1e-5).all()
    # the stored fp16 min never exceeds the true min, and min + 255 * scale covers the max
    kmin = torch.from_numpy(s["kmin"].astype(np.float32))
    assert (kmin <= k.amin(dim=2)).all()
    assert (kmin + 255 * kscale.squeeze(2) >= k.amax(dim=2) - 1e-5).all()
    # relative to each channel's (keys) / token's (values) range, the error stays well under 1 %
    k_err = (k2 - k).abs().amax(dim=2) / (k.amax(dim=2) - k.amin(dim=2))
    v_err = (v2 - v).abs().amax(dim=3) / (v.amax(dim=3) - v.amin(dim=3))
    assert k_err.max() < 0.01 and v_err.max() < 0.01


def test_int8_per_channel_keys_absorb_an_outlier_channel() -> None:
    k, v = make_kv(GQA, seed=4)
    k[:, :, :, 5] += 20.0  # a "massive activation" channel, as RoPE'd keys often have
    k2, v2 = decode_kv(encode_kv(k, v, codec="int8"))
    err = (k2 - k).abs()
    # per-token scaling would stretch every token's range to ~25 (mean error ~0.025)
    assert err.mean() < 0.01
    assert err[..., [d for d in range(64) if d != 5]].max() < 0.03
    assert err[..., 5].max() < 0.03


def test_int8_constant_channels_round_trip_exactly() -> None:
    k = torch.zeros(2, 2, 6, 4)
    k[..., 1] = 0.5
    k[..., 2] = -3.25
    v = torch.full((2, 2, 6, 4), 1.5)
    v[0, 0, 2] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    k2, v2 = decode_kv(encode_kv(k, v, codec="int8"))
    assert torch.equal(k2, k)
    constant = torch.ones(2, 2, 6, dtype=torch.bool)
    constant[0, 0, 2] = False
    assert torch.equal(v2[constant], v[constant])
    assert (v2[0, 0, 2] - v[0, 0, 2]).abs().max() <= 3 / 255


def test_blob_sizes() -> None:
    k, v = make_kv(GQA)
    sizes = {c: len(encode_kv(k, v, codec=c)) for c in CODECS}
    assert sizes["fp32"] / sizes["int8"] >= 3.5
    assert sizes["fp16"] / sizes["int8"] >= 1.8
    for c in CODECS:
        assert sizes[c] - kv_nbytes(*GQA, c) < 512  # header overhead
    assert kv_nbytes(*GQA, "fp32") == 2 * 4 * 30 * 3 * 150 * 64
    with pytest.raises(InvalidInputError):
        kv_nbytes(1, 1, 1, 1, "int4")


# ------------------------------------------------------------------------------- naive int8 reference


def naive_quantize(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-element reference of the scheme over a 1-D group: (codes, fp16 scale, fp16 min)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    mn = np.float16(lo)
    if float(mn) > lo:
        mn = np.nextafter(mn, np.float16(-np.inf))
    scale = np.float16((hi - float(mn)) / 255.0)
    if float(scale) < (hi - float(mn)) / 255.0:
        scale = np.nextafter(scale, np.float16(np.inf))
    if scale == 0:
        scale = np.float16(1.0)
    codes = np.array(
        [min(255, max(0, round((float(e) - float(mn)) / float(scale)))) for e in x], dtype=np.uint8
    )
    return codes, float(scale), float(mn)


def test_codes_match_a_naive_per_element_quantiser() -> None:
    k, v = make_kv((2, 3, 9, 5), seed=7)
    s = int8_sections(encode_kv(k, v, codec="int8"))
    kn, vn = k.numpy(), v.numpy()
    for layer in range(2):
        for head in range(3):
            for d in range(5):
                codes, scale, mn = naive_quantize(kn[layer, head, :, d])
                assert s["kscale"][layer, head, d] == np.float16(scale)
                assert s["kmin"][layer, head, d] == np.float16(mn)
                assert np.abs(s["kq"][layer, head, :, d].astype(int) - codes.astype(int)).max() <= 1
            for t in range(9):
                codes, scale, mn = naive_quantize(vn[layer, head, t, :])
                assert s["vscale"][layer, head, t] == np.float16(scale)
                assert s["vmin"][layer, head, t] == np.float16(mn)
                assert np.abs(s["vq"][layer, head, t, :].astype(int) - codes.astype(int)).max() <= 1


def test_dequantize_reference_matches_naive_loops() -> None:
    rng = np.random.default_rng(0)
    L, H, T, D = 2, 2, 5, 3
    kq = rng.integers(0, 256, (L, H, T, D), dtype=np.uint8)
    vq = rng.integers(0, 256, (L, H, T, D), dtype=np.uint8)
    kscale = rng.uniform(0.001, 0.1, (L, H, D)).astype(np.float16)
    kmin = rng.uniform(-5, 0, (L, H, D)).astype(np.float16)
    vscale = rng.uniform(0.001, 0.1, (L, H, T)).astype(np.float16)
    vmin = rng.uniform(-5, 0, (L, H, T)).astype(np.float16)
    keys, values = dequantize_int8_reference(
        *(torch.from_numpy(a) for a in (kq, kscale, kmin, vq, vscale, vmin)), dtype=torch.float32
    )
    for i in np.ndindex(L, H, T, D):
        layer, head, t, d = i
        want_k = float(kq[i]) * float(kscale[layer, head, d]) + float(kmin[layer, head, d])
        want_v = float(vq[i]) * float(vscale[layer, head, t]) + float(vmin[layer, head, t])
        assert abs(keys[i].item() - want_k) < 1e-5
        assert abs(values[i].item() - want_v) < 1e-5
    # and decode_kv runs exactly this function on the stored arrays
    k, v = make_kv((2, 2, 5, 3), seed=9)
    blob = encode_kv(k, v, codec="int8")
    s = int8_sections(blob)
    ref = dequantize_int8_reference(
        *(torch.from_numpy(s[n].copy()) for n in ("kq", "kscale", "kmin", "vq", "vscale", "vmin")),
        dtype=torch.float32,
    )
    got = decode_kv(blob)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ------------------------------------------------------------------------------------------- bad input


def test_encode_rejects_bad_tensors() -> None:
    k, v = make_kv((2, 2, 3, 4))
    with pytest.raises(InvalidInputError, match="codec"):
        encode_kv(k, v, codec="int4")
    with pytest.raises(InvalidInputError, match="shape"):
        encode_kv(k, v[:, :, :2], codec="fp16")
    with pytest.raises(InvalidInputError, match="shape"):
        encode_kv(k[0], v[0], codec="fp16")
    with pytest.raises(InvalidInputError, match="float"):
        encode_kv(k.long(), v.long(), codec="fp32")
    bad = k.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="float16"):
        encode_kv(bad, v, codec="int8")
    with pytest.raises(InvalidInputError, match="float16"):
        encode_kv(k * 1e6, v, codec="fp16")
    encode_kv(k * 1e6, v, codec="fp32")  # fp32 stores anything
    with pytest.raises(InvalidInputError):
        decode_kv(encode_kv(k, v, codec="fp32"), dtype=torch.int32)


def test_corruption_is_detected() -> None:
    k, v = make_kv((4, 2, 10, 8))
    for codec in CODECS:
        blob = encode_kv(k, v, codec=codec, digest="abc")
        _, off = split_blob(blob)
        flipped = bytearray(blob)
        flipped[off + (len(blob) - off) // 2] ^= 0x10
        with pytest.raises(CorruptBlobError, match="CRC"):
            decode_kv(bytes(flipped))
        for cut in (0, 3, 8, 20, off, len(blob) - 1):
            with pytest.raises(CorruptBlobError):
                decode_kv(blob[:cut])
        with pytest.raises(CorruptBlobError, match="oversized"):
            decode_kv(blob + b"\0")
        with pytest.raises(CorruptBlobError, match="magic"):
            decode_kv(b"KVRX" + blob[4:])
        with pytest.raises(CorruptBlobError, match="version"):
            decode_kv(blob[:4] + b"\x02" + blob[5:])
        with pytest.raises(CorruptBlobError, match="wrong key"):
            decode_kv(blob, expect_digest="abd")
        decode_kv(blob, expect_digest="abc")
        decode_kv(blob)  # no digest check asked
        with pytest.raises(CorruptBlobError, match="codec"):
            decode_kv(rewrite_header(blob, codec="int4"))
        with pytest.raises(CorruptBlobError, match="tokens"):
            decode_kv(rewrite_header(blob, tokens=-1))
        with pytest.raises(CorruptBlobError):
            decode_kv(rewrite_header(blob, tokens=11))  # shape no longer matches the payload
        with pytest.raises(CorruptBlobError, match="large"):  # sizes that overflow int64 shapes
            decode_kv(rewrite_header(blob[:off], layers=10**30, tokens=0, head_dim=0, payload_len=0, crc32=0))
        with pytest.raises(CorruptBlobError, match="JSON"):
            decode_kv(blob[:9] + b"x" + blob[10:])
        with pytest.raises(CorruptBlobError):
            blob_info(blob[:-1])
    # a consistent header with a recomputed CRC over a changed payload still decodes (it is a valid blob)
    blob = encode_kv(k, v, codec="fp32")
    h, off = split_blob(blob)
    payload = bytes(len(blob) - off)
    fine = rewrite_header(blob[:off] + payload, crc32=zlib.crc32(payload))
    assert decode_kv(fine)[0].abs().sum() == 0


def test_fuzzed_bytes_raise_only_corrupt_blob_error() -> None:
    rng = random.Random(1234)
    k, v = make_kv((2, 2, 6, 4))
    valid = [encode_kv(k, v, codec=c, digest="x") for c in CODECS]
    cases: list[bytes] = []
    for _ in range(150):  # pure garbage, some with the right magic and version
        body = rng.randbytes(rng.randrange(0, 300))
        cases.append(body)
        cases.append(b"KVRC\x01" + body)
        cases.append(b"KVRC\x01" + struct.pack("<I", rng.randrange(0, 400)) + body)
    for _ in range(150):  # mutated valid blobs: byte flips, cuts, splices
        blob = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        cases.append(bytes(blob))
        cases.append(bytes(blob[: rng.randrange(len(blob))]))
        h, off = split_blob(rng.choice(valid))
        header = json.dumps(h).encode()
        pos = rng.randrange(len(header))
        cases.append(
            b"KVRC\x01" + struct.pack("<I", len(header)) + header[:pos] + b"\xff" + header[pos + 1 :]
        )
    for case in cases:
        try:
            decode_kv(case, expect_digest=rng.choice([None, "x", "y"]))
        except CorruptBlobError as exc:
            assert str(exc)
            assert isinstance(exc, KvragError)


def test_decode_is_fast() -> None:
    k, v = make_kv((30, 3, 200, 64))
    blob = encode_kv(k, v, codec="fp16")
    decode_kv(blob)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        decode_kv(blob)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[3] < 0.025, times  # a few ms on a laptop; generous for loaded CI machines


def test_bf16_round_trip_is_exact_in_bfloat16() -> None:
    g = torch.Generator().manual_seed(11)
    k = torch.randn(30, 3, 9, 64, generator=g) * 50
    v = torch.randn(30, 3, 9, 64, generator=g)
    blob = encode_kv(k, v, codec="bf16", digest="d")
    kk, vv = decode_kv(blob, expect_digest="d")
    assert torch.equal(kk, k.bfloat16().float()) and torch.equal(vv, v.bfloat16().float())
    assert decode_kv(blob, dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert len(blob) - blob_info(blob)["payload_len"] < 512
    assert (
        blob_info(blob)["payload_len"] == kv_nbytes(30, 3, 9, 64, "bf16") == kv_nbytes(30, 3, 9, 64, "fp16")
    )
    flipped = bytearray(blob)
    flipped[-5] ^= 0x10
    with pytest.raises(CorruptBlobError):
        decode_kv(bytes(flipped))
    with pytest.raises(InvalidInputError):
        encode_kv(k * float("inf"), v, codec="bf16")
