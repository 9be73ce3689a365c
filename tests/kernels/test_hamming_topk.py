"""Hamming top-k: the torch reference against a naive numpy closed form, the Triton kernel against the
reference (interpreter on CPU, the GPU when present), and the dispatcher's choices and conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrag.encoders.compress import quantize_ubinary
from kvrag.kernels.hamming_topk import (
    PAD_DISTANCE,
    PAD_INDEX,
    hamming_topk,
    hamming_topk_torch,
    hamming_topk_triton,
)


def _naive(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack every bit, count differences, stable-sort each row (lower index first on ties), pad."""
    qb = np.unpackbits(queries, axis=1).astype(np.int64)
    cb = np.unpackbits(codes, axis=1).astype(np.int64)
    dist = (qb[:, None, :] != cb[None, :, :]).sum(axis=2)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    d = np.full((len(queries), k), PAD_DISTANCE, dtype=np.int64)
    i = np.full((len(queries), k), PAD_INDEX, dtype=np.int64)
    have = order.shape[1]
    d[:, :have] = np.take_along_axis(dist, order, axis=1)
    i[:, :have] = order
    return d, i


def _codes(rows: int, nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (rows, nbytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple) -> None:
    d, i = got
    assert d.dtype == torch.int32 and i.dtype == torch.int64
    assert np.array_equal(d.cpu().numpy(), np.asarray(want[0])), (d, want[0])
    assert np.array_equal(i.cpu().numpy(), np.asarray(want[1])), (i, want[1])


# ------------------------------------------------------------------------------ reference vs naive


@pytest.mark.parametrize(
    ("nq", "n", "nbytes", "k", "chunk"),
    [
        (3, 50, 8, 5, 7),  # chunks not a multiple of anything, 64-bit words
        (1, 20, 3, 4, None),  # one query, a row length that is not a multiple of 8 (padded words)
        (4, 40, 1, 10, 6),  # 8-bit codes: many equal distances, the tie-break decides
        (2, 6, 12, 9, 4),  # k larger than the number of codes: padding
        (5, 33, 16, 33, 1),  # k == n, one code per chunk
    ],
)
def test_reference_matches_naive(nq, n, nbytes, k, chunk):
    q, c = _codes(nq, nbytes, 1), _codes(n, nbytes, 2)
    _assert_same(hamming_topk_torch(q, c, k, chunk=chunk), _naive(q.numpy(), c.numpy(), k))


def test_reference_on_quantized_embeddings_and_numpy_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 64)).astype(np.float32)
    codes = quantize_ubinary(x)
    queries = quantize_ubinary(x[:4] + 0.3 * rng.standard_normal((4, 64)).astype(np.float32))
    d, i = hamming_topk(queries, codes, 3)  # numpy in, CPU dispatcher
    _assert_same((d, i), _naive(queries, codes, 3))
    assert i[:, 0].tolist() == [0, 1, 2, 3]  # each noisy query finds its own code


def test_padding_convention_and_empty_inputs():
    q, c = _codes(2, 4, 3), _codes(3, 4, 4)
    d, i = hamming_topk(q, c, 5)
    assert d.shape == (2, 5) and (i[:, 3:] == PAD_INDEX).all() and (d[:, 3:] == PAD_DISTANCE).all()
    assert sorted(i[0, :3].tolist()) == [0, 1, 2]
    d, i = hamming_topk(q, c[:0], 2)
    assert (i == -1).all() and (d == 2**31 - 1).all()
    d, i = hamming_topk(q[:0], c, 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def test_input_errors():
    q, c = _codes(2, 4, 3), _codes(3, 4, 4)
    with pytest.raises(ValueError, match="bytes per code"):
        hamming_topk(q, _codes(3, 5, 4), 1)
    with pytest.raises(ValueError, match="uint8"):
        hamming_topk(q.int(), c, 1)
    with pytest.raises(ValueError, match="positive"):
        hamming_topk(q, c, 0)
    with pytest.raises(ValueError, match="backend"):
        hamming_topk(q, c, 1, backend="cuda")


# ------------------------------------------------------------------------------ Triton vs reference


@pytest.mark.parametrize(
    ("nq", "n", "nbytes", "k", "opts"),
    [
        (3, 53, 8, 5, {"block_n": 16}),  # n not a multiple of the block, int32 words
        (1, 40, 3, 4, {"block_n": 16}),  # one query, byte loads (3 bytes per code)
        (5, 70, 1, 7, {"block_n": 16, "block_q": 2, "splits": 3}),  # ties, query blocks, splits
        (2, 6, 12, 9, {"block_n": 16}),  # k > n: padded
        (4, 37, 4, 1, {"block_n": 16, "block_q": 4, "splits": 2}),  # k = 1
        (2, 45, 8, 16, {"block_n": 16, "splits": 4}),  # k = BLOCK_N, last split partial
    ],
)
def test_triton_matches_reference(kernel_device, nq, n, nbytes, k, opts):
    q, c = _codes(nq, nbytes, 5), _codes(n, nbytes, 6)
    want = hamming_topk_torch(q, c, k)
    got = hamming_topk_triton(q.to(kernel_device), c.to(kernel_device), k, **opts)
    _assert_same(got, (want[0].numpy(), want[1].numpy()))


def test_triton_default_blocks_and_forced_dispatch(kernel_device):
    q, c = _codes(3, 32, 7), _codes(150, 32, 8)
    got = hamming_topk(q.to(kernel_device), c.to(kernel_device), 10, backend="triton")
    _assert_same(got, _naive(q.numpy(), c.numpy(), 10))


def test_triton_rejects_blocks_smaller_than_k(kernel_device):
    q, c = _codes(1, 4, 1), _codes(40, 4, 2)
    with pytest.raises(ValueError, match="block_n"):
        hamming_topk_triton(q.to(kernel_device), c.to(kernel_device), 20, block_n=16)


def test_auto_uses_the_reference_on_cpu(monkeypatch, no_interpreter):
    import kvrag.kernels.hamming_topk as mod

    def boom(*a, **k):
        raise AssertionError("the Triton launcher must not run for CPU tensors")

    monkeypatch.setattr(mod, "hamming_topk_triton", boom)
    q, c = _codes(2, 8, 1), _codes(9, 8, 2)
    _assert_same(hamming_topk(q, c, 3), _naive(q.numpy(), c.numpy(), 3))
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        hamming_topk(q, c, 3, backend="triton")


def test_reference_agrees_with_faiss_binary_flat():
    """Same distances and padding as faiss's exact binary index (faiss orders ties its own way)."""
    faiss = pytest.importorskip("faiss")
    q, c = _codes(4, 8, 9), _codes(25, 8, 10)
    index = faiss.IndexBinaryFlat(64)
    index.add(c.numpy())
    f_dist, f_idx = index.search(q.numpy(), 30)
    d, i = hamming_topk(q, c, 30)
    assert np.array_equal(d.numpy(), f_dist)
    assert np.array_equal(i[:, 25:].numpy(), f_idx[:, 25:])
