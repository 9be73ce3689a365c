"""A versioned binary format for one passage's KV cache (keys and values of every layer).

Layout (all integers little-endian)::

    b"KVRC" | version: u8 | header_len: u32 | header: UTF-8 JSON | payload

The header holds the codec, the shape (layers, kv_heads, tokens, head_dim), an opaque digest (the
cache key's hash, so a blob stored under the wrong key is caught), the payload length and its CRC-32.
It is padded with spaces so the payload starts on a 64-byte boundary of the blob.

Payloads:

- ``fp32`` / ``fp16`` / ``bf16``: keys then values, raw, shape (L, H, T, D) (bf16 as its 16-bit patterns).
- ``int8``: asymmetric uint8 min/max quantisation. Keys per channel (over the tokens of each layer,
  kv head and head_dim channel), values per token (over head_dim). Order: key codes (L, H, T, D) u8,
  value codes (L, H, T, D) u8, key scale (L, H, D) f16, key min (L, H, D) f16, value scale (L, H, T)
  f16, value min (L, H, T) f16. Reconstruction is ``code * scale + min``.

No pickle and no framework serialisation is involved: a blob is plain bytes a reader can check.
"""

from __future__ import annotations

import json
import struct
import sys
import warnings
import zlib
from typing import Any

import numpy as np
import torch

from kvrag.errors import InvalidInputError, KvragError
from kvrag.kernels.kv_reference import dequantize_int8_reference

MAGIC = b"KVRC"
FORMAT_VERSION = 1
CODECS = ("fp32", "fp16", "bf16", "int8")

_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_ALIGN = 64
_MAX_HEADER = 1 << 20
_MAX_DIM = (1 << 31) - 1
_FP16_MAX = 65504.0
_HEADER_INTS = ("layers", "kv_heads", "tokens", "head_dim", "crc32", "payload_len")
_LITTLE = sys.byteorder == "little"


class CorruptBlobError(KvragError):
    """A KV-cache blob cannot be decoded: bad magic or version, truncated, corrupted, or stored under the
    wrong key. Drop it and recompute the cache."""


def _prime_frombuffer_warning() -> None:
    """Consume torch's warn-once about read-only buffers: decoding only reads them, then copies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_prime_frombuffer_warning()


def kv_nbytes(layers: int, kv_heads: int, tokens: int, head_dim: int, codec: str) -> int:
    """Payload size in bytes of one passage's keys and values under `codec` (header excluded)."""
    n = layers * kv_heads * tokens * head_dim
    if codec == "fp32":
        return 2 * n * 4
    if codec in ("fp16", "bf16"):
        return 2 * n * 2
    if codec == "int8":
        return 2 * n + 2 * 2 * layers * kv_heads * head_dim + 2 * 2 * layers * kv_heads * tokens
    raise InvalidInputError(f"unknown KV codec {codec!r}; use one of {', '.join(CODECS)}")


# ----------------------------------------------------------------------------------------------- int8


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, rounded towards -inf (so the stored min never exceeds the true min)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, rounded towards +inf (so min + 255 * scale covers the true max)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes, fp16 scale and fp16 min of float32 `x`, reducing over `dim`."""
    if x.shape[dim] == 0:
        shape = list(x.shape)
        del shape[dim]
        return (
            torch.empty(x.shape, dtype=torch.uint8),
            torch.ones(shape, dtype=torch.float16),
            torch.zeros(shape, dtype=torch.float16),
        )
    lo = _fp16_down(x.amin(dim=dim))
    hi = x.amax(dim=dim)
    scale = _fp16_up((hi - lo.float()) / 255.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant: every code is 0
    s32 = scale.float().unsqueeze(dim)
    codes = torch.round((x - lo.float().unsqueeze(dim)) / s32).clamp_(0, 255).to(torch.uint8)
    return codes, scale, lo


# --------------------------------------------------------------------------------------------- encode


def _check_tensors(keys: torch.Tensor, values: torch.Tensor) -> None:
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{name} must be a float tensor, got {t.dtype}")
        if t.dim() != 4:
            raise InvalidInputError(
                f"{name} must have shape (layers, kv_heads, tokens, head_dim), got {tuple(t.shape)}"
            )
    if keys.shape != values.shape:
        raise InvalidInputError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")


def _le_buffer(t: torch.Tensor, np_dtype: str) -> np.ndarray:
    """A contiguous little-endian numpy view (or copy on big-endian hosts) of CPU tensor `t`."""
    return np.ascontiguousarray(t.contiguous().numpy().astype(np_dtype, copy=False))


def encode_kv(keys: torch.Tensor, values: torch.Tensor, *, codec: str, digest: str = "") -> bytes:
    """Serialise one passage's keys and values, each (layers, kv_heads, tokens, head_dim), to a blob."""
    if codec not in CODECS:
        raise InvalidInputError(f"unknown KV codec {codec!r}; use one of {', '.join(CODECS)}")
    if not isinstance(digest, str):
        raise InvalidInputError("digest must be a string")
    _check_tensors(keys, values)
    keys, values = keys.detach().cpu(), values.detach().cpu()
    layers, kv_heads, tokens, head_dim = (int(n) for n in keys.shape)

    if codec == "fp32":
        parts = [_le_buffer(keys.float(), "<f4"), _le_buffer(values.float(), "<f4")]
    elif codec == "bf16":
        for name, t in (("keys", keys), ("values", values)):
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise InvalidInputError(f"{name} hold non-finite values; codec 'bf16' cannot store them")
        parts = [_le_buffer(t.bfloat16().view(torch.int16), "<i2") for t in (keys, values)]
    else:
        for name, t in (("keys", keys), ("values", values)):
            if t.numel() and not bool(t.abs().amax() <= _FP16_MAX):
                raise InvalidInputError(
                    f"{name} hold non-finite values or values beyond the float16 range; "
                    f"codec {codec!r} cannot store them (use fp32)"
                )
        if codec == "fp16":
            parts = [_le_buffer(keys.half(), "<f2"), _le_buffer(values.half(), "<f2")]
        else:
            kq, kscale, kmin = _quantize(keys.float(), dim=2)
            vq, vscale, vmin = _quantize(values.float(), dim=3)
            parts = [_le_buffer(kq, "u1"), _le_buffer(vq, "u1")]
            parts += [_le_buffer(t, "<f2") for t in (kscale, kmin, vscale, vmin)]

    crc = 0
    payload_len = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        payload_len += part.nbytes
    expected = kv_nbytes(layers, kv_heads, tokens, head_dim, codec)
    assert payload_len == expected, (payload_len, expected)
    header = json.dumps(
        {
            "codec": codec,
            "layers": layers,
            "kv_heads": kv_heads,
            "tokens": tokens,
            "head_dim": head_dim,
            "digest": digest,
            "crc32": crc,
            "payload_len": payload_len,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    pad = -(_PREFIX.size + len(header)) % _ALIGN
    header += b" " * pad
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *parts])


# --------------------------------------------------------------------------------------------- decode


def _parse(blob: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview, int]:
    """Validate the framing and header; return (header, blob view, payload offset)."""
    try:
        mv = memoryview(blob).cast("B")
    except (TypeError, ValueError) as exc:
        raise CorruptBlobError(f"KV blob is not a contiguous bytes buffer: {exc}") from None
    if len(mv) < _PREFIX.size:
        raise CorruptBlobError(f"KV blob too short ({len(mv)} bytes) to hold a header")
    magic, version, header_len = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptBlobError(f"not a KV blob: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlobError(
            f"unknown KV blob format version {version} (this build reads {FORMAT_VERSION})"
        )
    start = _PREFIX.size + header_len
    if header_len > _MAX_HEADER or start > len(mv):
        raise CorruptBlobError(f"KV blob truncated: header of {header_len} bytes, blob of {len(mv)}")
    try:
        header = json.loads(bytes(mv[_PREFIX.size : start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptBlobError(f"KV blob header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptBlobError("KV blob header is not a JSON object")
    for name in _HEADER_INTS:
        v = header.get(name)
        if type(v) is not int or v < 0:
            raise CorruptBlobError(f"KV blob header field {name!r} is missing or not a non-negative int")
    for name in ("layers", "kv_heads", "tokens", "head_dim"):
        if header[name] > _MAX_DIM:
            raise CorruptBlobError(f"KV blob header field {name!r} = {header[name]} is implausibly large")
    if header.get("codec") not in CODECS:
        raise CorruptBlobError(f"KV blob has unknown codec {header.get('codec')!r}")
    if not isinstance(header.get("digest"), str):
        raise CorruptBlobError("KV blob header field 'digest' is missing or not a string")
    expected = kv_nbytes(
        header["layers"], header["kv_heads"], header["tokens"], header["head_dim"], header["codec"]
    )
    if header["payload_len"] != expected:
        raise CorruptBlobError(
            f"KV blob header is inconsistent: payload_len {header['payload_len']}, shape implies {expected}"
        )
    actual = len(mv) - start
    if actual != expected:
        what = "truncated" if actual < expected else "oversized"
        raise CorruptBlobError(f"KV blob {what}: payload of {actual} bytes, header says {expected}")
    return header, mv, start


def blob_info(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The header of a blob (codec, shape, digest, crc32, payload_len) plus `nbytes`, the blob size.

    Checks the framing and sizes but not the CRC (that needs a pass over the payload).
    """
    header, mv, _ = _parse(blob)
    keep = ("codec", "layers", "kv_heads", "tokens", "head_dim", "digest", "crc32", "payload_len")
    info = {k: header[k] for k in keep}
    info["nbytes"] = len(mv)
    return info


def _section(mv: memoryview, offset: int, count: int, dtype: torch.dtype, np_dtype: str) -> torch.Tensor:
    """A tensor over `count` items at `offset` of `mv`: a zero-copy view when aligned on a little-endian
    host, else a copy. Callers only read it."""
    item = torch.empty((), dtype=dtype).element_size()
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if _LITTLE:
        t = torch.frombuffer(mv, dtype=torch.uint8, count=count * item, offset=offset)
        if t.data_ptr() % item == 0:
            return t.view(dtype)
    arr = np.frombuffer(mv, dtype=np_dtype, count=count, offset=offset)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def decode_kv(
    blob: bytes | bytearray | memoryview,
    *,
    expect_digest: str | None = None,
    dtype: torch.dtype = torch.float32,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values, each a new contiguous (layers, kv_heads, tokens, head_dim) tensor in `dtype`.

    With `out=(keys, values)` (tensors of that shape, possibly strided views into a larger cache) the
    data is written there instead, with no intermediate tensor, and `out` is returned.

    Raises CorruptBlobError for any malformed blob, a CRC mismatch, or (when `expect_digest` is given)
    a digest that differs from the one stored.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a torch float dtype, got {dtype!r}")
    header, mv, start = _parse(blob)
    if expect_digest is not None and header["digest"] != expect_digest:
        raise CorruptBlobError(
            f"KV blob digest {header['digest']!r} does not match the key's {expect_digest!r} "
            "(stored under the wrong key)"
        )
    if zlib.crc32(mv[start:]) != header["crc32"]:
        raise CorruptBlobError("KV blob payload fails its CRC-32 check (corrupted in storage or transit)")

    shape = (header["layers"], header["kv_heads"], header["tokens"], header["head_dim"])
    layers, kv_heads, tokens, head_dim = shape
    if out is not None and (tuple(out[0].shape) != shape or tuple(out[1].shape) != shape):
        raise CorruptBlobError(f"KV blob has shape {shape}, the destination {tuple(out[0].shape)}")
    n = layers * kv_heads * tokens * head_dim
    codec = header["codec"]
    if codec in ("fp32", "fp16", "bf16"):
        src, np_dtype = {
            "fp32": (torch.float32, "<f4"),
            "fp16": (torch.float16, "<f2"),
            "bf16": (torch.int16, "<i2"),
        }[codec]
        item = 4 if codec == "fp32" else 2
        k = _section(mv, start, n, src, np_dtype).view(shape)
        v = _section(mv, start + n * item, n, src, np_dtype).view(shape)
        if codec == "bf16":
            k, v = k.view(torch.bfloat16), v.view(torch.bfloat16)
        if out is not None:
            out[0].copy_(k)
            out[1].copy_(v)
            return out
        return k.to(dtype, copy=True), v.to(dtype, copy=True)

    off = start
    kq = _section(mv, off, n, torch.uint8, "u1").view(shape)
    vq = _section(mv, off + n, n, torch.uint8, "u1").view(shape)
    off += 2 * n
    nk, nv = layers * kv_heads * head_dim, layers * kv_heads * tokens
    kscale = _section(mv, off, nk, torch.float16, "<f2").view(layers, kv_heads, head_dim)
    kmin = _section(mv, off + 2 * nk, nk, torch.float16, "<f2").view(layers, kv_heads, head_dim)
    off += 4 * nk
    vscale = _section(mv, off, nv, torch.float16, "<f2").view(layers, kv_heads, tokens)
    vmin = _section(mv, off + 2 * nv, nv, torch.float16, "<f2").view(layers, kv_heads, tokens)
    if out is not None and out[0].is_cuda and out[1].device == out[0].device:
        # Destination on the GPU: move the compressed codes and scales (1 byte per value instead of 4)
        # and dequantise there, straight into `out`, with the fused Triton kernel.
        from kvrag.kernels.kv_dequant import kv_dequant

        dev = out[0].device
        parts = [t.to(dev) for t in (kq, kscale, kmin, vq, vscale, vmin)]
        return kv_dequant(*parts, out=out)
    keys, values = dequantize_int8_reference(kq, kscale, kmin, vq, vscale, vmin, dtype)
    if out is not None:
        out[0].copy_(keys)
        out[1].copy_(values)
        return out
    return keys, values
