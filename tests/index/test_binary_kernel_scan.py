"""BFlat with `scan="kernel"`: the Hamming top-k kernel (here its torch reference, reached through the
dispatcher on CPU tensors) answers the candidate step instead of FAISS `IndexBinaryFlat`.

Both scans must give the same ids and scores as an exact brute force over the packed codes, which
ranks by (Hamming distance, row): FAISS's heap scan keeps the lower row on ties, and so does the
kernel. 64-bit codes of 2000 vectors tie a lot, and one data set below is built of duplicates, so a
scan that broke ties another way, kept a deleted row, or mapped positions to the wrong rows fails.
External ids are 10 * row + 3 so that rows and ids cannot be confused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kvrag.kernels.hamming_topk as hamming_module
from kvrag.encoders.compress import normalize, quantize_ubinary
from kvrag.errors import InvalidInputError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.vector import MANIFEST, VectorIndex

DIM = 64
NB = 2000
NQ = 60
NOISE = 0.3  # queries near a database vector, but with plenty of Hamming ties around it


class Mirror:
    """What an index should hold, row by row: ids, unit vectors and liveness, for the brute force."""

    def __init__(self):
        self.ids = np.zeros(0, np.int64)
        self.x = np.zeros((0, DIM), np.float32)
        self.live = np.zeros(0, bool)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, ids])
        self.x = np.concatenate([self.x, normalize(x)])
        self.live = np.concatenate([self.live, np.ones(len(ids), bool)])

    def remove(self, ids: np.ndarray) -> None:
        self.live &= ~np.isin(self.ids, ids)

    def hamming(self, vi: VectorIndex, queries: np.ndarray) -> np.ndarray:
        """(nq, rows) Hamming distances between query codes and every row's code."""
        qc = quantize_ubinary(normalize(queries), vi.binary)
        bc = quantize_ubinary(self.x, vi.binary)
        return np.unpackbits(qc[:, None, :] ^ bc[None, :, :], axis=-1).sum(axis=-1)

    def exact(
        self, vi: VectorIndex, queries: np.ndarray, k: int, rescore: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """What `search` must return: the k * rescore candidates of lowest (distance, row) among the live
        rows, scored by Hamming similarity (rescore 1) or float inner product, best first, padded."""
        q = normalize(queries)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        if allowed is not None:  # filtered search is exact over the allowed live rows
            rows = np.flatnonzero(self.live & np.isin(self.ids, allowed))
            for i in range(len(q)):
                s = self.x[rows] @ q[i]
                order = np.argsort(-s, kind="stable")[:k]
                out_s[i, : len(order)], out_i[i, : len(order)] = s[order], self.ids[rows][order]
            return out_s, out_i
        live = np.flatnonzero(self.live)
        fetch = min(k * rescore, len(live))
        dist = self.hamming(vi, q)[:, live]
        for i in range(len(q)):
            cand = live[np.lexsort((live, dist[i]))[:fetch]]  # by distance, then row
            if rescore > 1:
                s = self.x[cand] @ q[i]
            else:
                s = (1.0 - 2.0 * dist[i][np.searchsorted(live, cand)].astype(np.float32) / DIM).astype(
                    np.float32
                )
            order = np.argsort(-s, kind="stable")[:k]
            out_s[i, : len(order)], out_i[i, : len(order)] = s[order], self.ids[cand][order]
        return out_s, out_i


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    xb = normalize(rng.standard_normal((NB, DIM)))
    src = rng.choice(NB, NQ, replace=False)
    xq = normalize(xb[src] + NOISE * rng.standard_normal((NQ, DIM)))
    return xb, 10 * np.arange(NB, dtype=np.int64) + 3, xq


def pair(ids: np.ndarray, x: np.ndarray, **kwargs) -> tuple[VectorIndex, VectorIndex, Mirror]:
    """The same vectors in a FAISS-scan and a kernel-scan BFlat index, and their mirror."""
    faiss_vi = VectorIndex("BFlat", DIM, binary_method="mean", **kwargs)
    kernel_vi = VectorIndex("BFlat", DIM, binary_method="mean", scan="kernel", **kwargs)
    mirror = Mirror()
    for vi in (faiss_vi, kernel_vi):
        vi.add(ids, x)
    mirror.add(ids, x)
    assert faiss_vi.scan == "faiss" and kernel_vi.scan == "kernel"
    return faiss_vi, kernel_vi, mirror


def assert_same(faiss_vi, kernel_vi, mirror, queries, k, rescore=1, allowed=None) -> None:
    """Both scans equal each other bit for bit, and the brute force (ids exactly, scores closely)."""
    fs, fi = faiss_vi.search(queries, k, rescore=rescore, allowed_ids=allowed)
    ks, ki = kernel_vi.search(queries, k, rescore=rescore, allowed_ids=allowed)
    es, ei = mirror.exact(kernel_vi, queries, k, rescore, allowed)
    np.testing.assert_array_equal(ki, fi)
    np.testing.assert_array_equal(ks, fs)
    np.testing.assert_array_equal(ki, ei)
    np.testing.assert_allclose(ks, es, atol=1e-6)


@pytest.fixture
def counted(monkeypatch) -> list[tuple[int, int]]:
    """Records (queries, k) of every dispatcher call, so the tests know the kernel path really ran."""
    calls: list[tuple[int, int]] = []
    real = hamming_module.hamming_topk

    def spy(queries, codes, k, **kwargs):
        calls.append((len(queries), k))
        return real(queries, codes, k, **kwargs)

    monkeypatch.setattr(hamming_module, "hamming_topk", spy)
    return calls


# --- choosing the scan ---------------------------------------------------------------------------


def test_scan_defaults_and_validation():
    assert VectorIndex("BFlat", DIM).scan == "faiss"
    assert VectorIndex("BFlat", DIM, device="cpu").scan == "faiss"
    assert VectorIndex("BFlat", DIM, device="cpu", scan="kernel").scan == "kernel"
    # a CUDA device picks the kernel for BFlat only, and only where CUDA is there
    cuda = VectorIndex("BFlat", DIM, device="cuda")
    assert (cuda.device, cuda.scan) == ("cuda", "kernel" if torch.cuda.is_available() else "faiss")
    for spec in ("Flat", "SQ8", "BHNSW32", "BIVF16"):
        assert VectorIndex(spec, DIM, device="cuda").scan == "faiss"
        with pytest.raises(InvalidInputError, match="BFlat"):
            VectorIndex(spec, DIM, scan="kernel")
    with pytest.raises(InvalidInputError, match="scan"):
        VectorIndex("BFlat", DIM, scan="gpu")
    with pytest.raises(InvalidInputError, match="device"):
        VectorIndex("BFlat", DIM, device="no-such-device", scan="kernel")


def test_kernel_scan_calls_the_dispatcher_and_faiss_scan_does_not(data, counted):
    xb, ids, xq = data
    faiss_vi, kernel_vi, _ = pair(ids[:300], xb[:300])
    faiss_vi.search(xq[:4], 5, rescore=3)
    assert counted == []
    kernel_vi.search(xq[:4], 5, rescore=3)
    assert counted == [(4, 15)]
    kernel_vi.search(xq[:4], 5, allowed_ids=ids[:50])  # filtered search is exact, no scan
    assert counted == [(4, 15)]


# --- same results as FAISS and the brute force ---------------------------------------------------


def test_data_has_ties_at_the_cut(data):
    """The comparisons below only prove the tie order when the k-th and (k+1)-th distances tie."""
    xb, ids, xq = data
    _, kernel_vi, mirror = pair(ids, xb)
    dist = np.sort(mirror.hamming(kernel_vi, xq), axis=1)
    for k in (1, 10, 40):
        assert (dist[:, k - 1] == dist[:, k]).sum() >= NQ // 4, k


@pytest.mark.parametrize("rescore", [1, 4])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_same_as_faiss_and_brute_force(data, counted, k, rescore):
    xb, ids, xq = data
    assert_same(*pair(ids, xb), xq, k, rescore)
    assert counted


def test_ties_of_duplicate_vectors_keep_the_lower_row(data):
    """300 rows made of 20 distinct vectors: every distance is shared by at least ~15 rows."""
    xb, _, xq = data
    rng = np.random.default_rng(3)
    x = xb[rng.integers(0, 20, 300)]
    ids = 10 * np.arange(300, dtype=np.int64) + 3
    faiss_vi, kernel_vi, mirror = pair(ids, x)
    for k in (1, 7, 33, 150):
        assert_same(faiss_vi, kernel_vi, mirror, xq, k)
    # the raw candidate step itself (scores and rows, before any re-ranking) is identical too
    q = normalize(xq)
    for n in (1, 16, 299):
        fr, kr = faiss_vi._raw_search(q, n), kernel_vi._raw_search(q, n)
        np.testing.assert_array_equal(kr[1], fr[1])
        np.testing.assert_array_equal(kr[0], fr[0])


@pytest.mark.parametrize("rescore", [1, 4])
def test_allowed_ids(data, rescore):
    xb, ids, xq = data
    faiss_vi, kernel_vi, mirror = pair(ids, xb)
    rng = np.random.default_rng(11)
    allowed = np.concatenate([rng.choice(ids, 300, replace=False), [999_999_993]])  # unknown id ignored
    assert_same(faiss_vi, kernel_vi, mirror, xq, 10, rescore, allowed)
    assert_same(faiss_vi, kernel_vi, mirror, xq, 10, rescore, ids[:4])  # fewer than k: padded
    for vi in (faiss_vi, kernel_vi):
        vi.remove(allowed[:100])
    mirror.remove(allowed[:100])
    assert_same(faiss_vi, kernel_vi, mirror, xq, 10, rescore, allowed)


@pytest.mark.parametrize("search_first", [False, True])
def test_removals_and_re_adds(data, counted, search_first):
    """Removing rows, before the kernel copied the codes (built from the live rows) or after (kept in
    step on the device), then adding rows behind the removed ones."""
    xb, ids, xq = data
    faiss_vi, kernel_vi, mirror = pair(ids, xb)
    if search_first:
        assert_same(faiss_vi, kernel_vi, mirror, xq, 10)
    # the nearest rows of the first queries: without the removal they would lead the raw results
    _, nearest = mirror.exact(kernel_vi, xq[:20], 3, 1)
    gone = np.unique(np.concatenate([nearest.ravel(), ids[::7]]))
    for vi in (faiss_vi, kernel_vi):
        assert vi.remove(gone) == len(gone)
    mirror.remove(gone)
    for k, rescore in ((1, 1), (10, 1), (10, 4), (40, 2)):
        assert_same(faiss_vi, kernel_vi, mirror, xq, k, rescore)
    _, got = kernel_vi.search(xq, 40, rescore=2)
    assert not np.isin(got, gone).any()

    back = gone[: len(gone) // 2]  # re-added as new rows, after all the others
    for vi in (faiss_vi, kernel_vi):
        vi.add(back, xb[(back - 3) // 10])
    mirror.add(back, xb[(back - 3) // 10])
    new_ids = np.arange(5, dtype=np.int64) * 10 + 100_000
    for vi in (faiss_vi, kernel_vi):
        vi.add(new_ids, xq[:5])  # exact copies of queries: their top hit
    mirror.add(new_ids, xq[:5])
    for k, rescore in ((1, 1), (10, 1), (10, 4)):
        assert_same(faiss_vi, kernel_vi, mirror, xq, k, rescore)
    _, top = kernel_vi.search(xq[:5], 1)
    np.testing.assert_array_equal(top[:, 0], new_ids)
    assert counted


def test_k_beyond_the_live_rows_pads(data):
    xb, ids, xq = data
    faiss_vi, kernel_vi, mirror = pair(ids[:30], xb[:30])
    for vi in (faiss_vi, kernel_vi):
        vi.remove(ids[:30:3])
    mirror.remove(ids[:30:3])
    for k, rescore in ((25, 1), (50, 1), (50, 3), (1000, 2)):
        assert_same(faiss_vi, kernel_vi, mirror, xq, k, rescore)
    scores, got = kernel_vi.search(xq, 50)
    assert (got[:, :20] >= 0).all() and (got[:, 20:] == -1).all() and np.isneginf(scores[:, 20:]).all()
    # asked directly for more candidates than live rows: the same padding as FAISS's
    fr, kr = faiss_vi._raw_search(normalize(xq), 64), kernel_vi._raw_search(normalize(xq), 64)
    np.testing.assert_array_equal(kr[1], fr[1])
    np.testing.assert_array_equal(kr[0], fr[0])
    assert (kr[1][:, 20:] == -1).all()

    for vi in (faiss_vi, kernel_vi):  # nothing left at all
        vi.remove(ids[:30])
    mirror.remove(ids[:30])
    assert_same(faiss_vi, kernel_vi, mirror, xq[:3], 5, 2)
    fr, kr = faiss_vi._raw_search(normalize(xq[:3]), 4), kernel_vi._raw_search(normalize(xq[:3]), 4)
    np.testing.assert_array_equal(kr[1], fr[1])
    np.testing.assert_array_equal(kr[0], fr[0])


# --- persistence ---------------------------------------------------------------------------------


def test_save_load_keeps_the_format_and_the_results(data, tmp_path, counted):
    xb, ids, xq = data
    faiss_vi, kernel_vi, mirror = pair(ids, xb, encoder="test/encoder")
    kernel_vi.search(xq[:2], 3)  # the device copy exists before the removal
    for vi in (faiss_vi, kernel_vi):
        vi.remove(ids[5:50])
    mirror.remove(ids[5:50])
    faiss_dir, kernel_dir = faiss_vi.save(tmp_path / "faiss"), kernel_vi.save(tmp_path / "kernel")

    # the scan is not part of the saved index: same files, same manifest, same bytes
    def manifest(folder):
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        m.pop("saved_at")
        return m

    assert manifest(kernel_dir) == manifest(faiss_dir)
    assert "scan" not in json.dumps(manifest(kernel_dir)) and "device" not in manifest(kernel_dir)
    assert sorted(p.name for p in kernel_dir.iterdir()) == sorted(p.name for p in faiss_dir.iterdir())
    for p in faiss_dir.iterdir():
        if p.name != MANIFEST:
            assert (kernel_dir / p.name).read_bytes() == p.read_bytes(), p.name

    assert VectorIndex.load(kernel_dir).scan == "faiss"  # the CPU default, whoever saved it
    loaded_faiss = VectorIndex.load(kernel_dir)
    loaded_kernel = VectorIndex.load(faiss_dir, scan="kernel")
    assert loaded_kernel.scan == "kernel" and loaded_kernel.device == "cpu"
    for k, rescore in ((1, 1), (10, 1), (10, 4)):
        assert_same(loaded_faiss, loaded_kernel, mirror, xq, k, rescore)
    assert_same(loaded_faiss, loaded_kernel, mirror, xq, 10, 1, ids[:200])

    # and after load, changes are tracked as before
    for vi in (loaded_faiss, loaded_kernel):
        vi.remove(ids[100:150])
        vi.add(ids[5:10], xb[5:10])
    mirror.remove(ids[100:150])
    mirror.add(ids[5:10], xb[5:10])
    assert_same(loaded_faiss, loaded_kernel, mirror, xq, 10, 4)
    with pytest.raises(InvalidInputError):  # a bad option is the caller's error, not a corrupt index
        VectorIndex.load(faiss_dir, scan="gpu")
    assert counted


# --- collections ---------------------------------------------------------------------------------


def test_collection_hands_only_a_cuda_device_to_its_index(tmp_path):
    config = CollectionConfig(encoder="test/encoder", spec="BFlat")
    cpu = Collection.create(tmp_path, "cpu", config, device="cpu")
    try:
        assert cpu.device is None
        vi = cpu.ensure_index(DIM)
        assert (vi.device, vi.scan) == ("cpu", "faiss")
    finally:
        cpu.close()
    gpu = Collection.create(tmp_path, "gpu", config, device="cuda")
    try:
        assert gpu.device == "cuda"
        vi = gpu.ensure_index(DIM)
        assert (vi.device, vi.scan) == ("cuda", "kernel" if torch.cuda.is_available() else "faiss")
        rng = np.random.default_rng(0)
        vi.add(np.arange(50), rng.standard_normal((50, DIM)))
        gpu.commit()
    finally:
        gpu.close()
    reopened = Collection.open(tmp_path, "gpu", device="cuda")
    try:
        assert reopened.index is not None and reopened.index.device == "cuda"
        assert reopened.index.ntotal == 50
    finally:
        reopened.close()
    plain = Collection.open(tmp_path, "gpu")
    try:
        assert plain.device is None and plain.index.scan == "faiss"
    finally:
        plain.close()
