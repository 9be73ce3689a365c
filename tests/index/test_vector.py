"""Tests for index.vector: specs and options, search quality against brute force, deletion, filters,
persistence, corruption and crash safety.

The data follows faiss contrib/datasets.py SyntheticDataset: seeded gaussian vectors, queries that are
noisy copies of known database vectors, and exact neighbours computed by brute force with numpy.
External ids are 10 * row + 3, never row numbers, so any confusion between the two shows up.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import kvrag.index.vectors.persist as persist_module
from kvrag.encoders.compress import normalize, quantize_int8, quantize_ubinary
from kvrag.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError
from kvrag.index.vector import (
    MANIFEST,
    STRATEGIES,
    AdaptorMethod,
    BinaryMethod,
    Family,
    Precision,
    RescoreCodec,
    ScanMode,
    VectorIndex,
    parse_spec,
)
from kvrag.index.vectors.binary import BinaryStrategy
from kvrag.index.vectors.floating import FloatStrategy
from kvrag.index.vectors.int8 import Int8Strategy

ROOT = Path(__file__).resolve().parents[2]
CRASH_CHILD = Path(__file__).with_name("crash_child.py")

DIM = 64
NB = 2000  # database vectors
NQ = 200  # queries
NOISE = 0.05  # per-component query noise: cosine to the source ~0.93, to any other vector < 0.6

SPECS = ["Flat", "HNSW32", "SQ8", "HNSW16,SQ8", "BFlat", "BHNSW32", "BIVF16"]
# deletion must work the same whether FAISS can remove vectors (flat, IVF) or not (HNSW graphs)
REMOVABLE = ["Flat", "SQ8", "BFlat", "BIVF16"]
TOMBSTONED = ["HNSW32", "BHNSW32"]


@dataclass(frozen=True)
class Synthetic:
    xb: np.ndarray  # (NB, DIM) unit-norm database vectors
    ids: np.ndarray  # (NB,) external id of each database row
    xq: np.ndarray  # (NQ, DIM) unit-norm queries
    src: np.ndarray  # (NQ,) database row each query is a noisy copy of

    def row_of(self, ids: np.ndarray) -> np.ndarray:
        return (np.asarray(ids) - 3) // 10

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        return self.xb[self.row_of(ids)]

    def exact(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k (scores, ids) by inner product over all rows or the given rows."""
        rows = np.arange(len(self.xb)) if rows is None else np.asarray(rows)
        scores = queries @ self.xb[rows].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), self.ids[rows][order]

    def dots(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact score of each (query, returned id) pair: (n, k)."""
        return np.einsum("qd,qkd->qk", queries, self.vectors_of(ids))


@pytest.fixture(scope="module")
def data() -> Synthetic:
    rng = np.random.default_rng(1234)
    xb = normalize(rng.standard_normal((NB, DIM)))
    src = rng.choice(NB, NQ, replace=False)
    xq = normalize(xb[src] + NOISE * rng.standard_normal((NQ, DIM)))
    synthetic = Synthetic(xb, 10 * np.arange(NB, dtype=np.int64) + 3, xq, src)
    # ground truth sanity: each query's exact nearest neighbour is its source, by a clear margin
    scores, ids = synthetic.exact(xq, 2)
    np.testing.assert_array_equal(ids[:, 0], synthetic.ids[src])
    assert (scores[:, 0] - scores[:, 1]).min() > 0.2
    return synthetic


def build(spec: str, data: Synthetic, rows=slice(None), **kwargs) -> VectorIndex:
    """A fresh index holding data.xb[rows] under data.ids[rows]; BIVF probes every list."""
    vi = VectorIndex(spec, DIM, **kwargs)
    vi.add(data.ids[rows], data.xb[rows])
    if vi.spec.family == "bivf":
        vi.nprobe = vi.spec.param
    return vi


@pytest.fixture(scope="module")
def shared(data) -> Callable[[str], VectorIndex]:
    """Read-only indexes over the whole database with default settings (ITQ binary calibration), built
    once per spec. Tests that mutate an index build their own."""
    cache: dict[str, VectorIndex] = {}

    def get(spec: str) -> VectorIndex:
        if spec not in cache:
            cache[spec] = build(spec, data)
        return cache[spec]

    return get


def fast(spec: str, data: Synthetic, rows=slice(None), **kwargs) -> VectorIndex:
    """A fresh index for mutation tests; binary specs use mean centring (ITQ is covered elsewhere and its
    fit is slow on small shared machines)."""
    return build(spec, data, rows, binary_method="mean", **kwargs)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def file_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def referenced_files(folder: Path) -> set[str]:
    """The manifest and every file it names: after a successful save the folder holds exactly these."""
    m = read_manifest(folder)
    names = {MANIFEST, *(name for name in m["files"].values() if name)}
    if m.get("binary") and m["binary"].get("rotation"):
        names.add(m["binary"]["rotation"])
    return names


def data_file(folder: Path, key: str) -> Path:
    """Path of the file the manifest names for `key` (index, ids, vectors, codes)."""
    return folder / read_manifest(folder)["files"][key]


# --- spec parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "family", "param", "precision"),
    [
        ("Flat", "flat", 0, "float32"),
        ("HNSW32", "hnsw", 32, "float32"),
        ("SQ8", "sq8", 0, "int8"),
        ("HNSW16,SQ8", "hnsw_sq8", 16, "int8"),
        ("BFlat", "bflat", 0, "ubinary"),
        ("BHNSW32", "bhnsw", 32, "ubinary"),
        ("BIVF16", "bivf", 16, "ubinary"),
    ],
)
def test_parse_spec_accepts_known_specs(spec, family, param, precision):
    parsed = parse_spec(spec)
    assert (parsed.text, parsed.family, parsed.param) == (spec, family, param)
    assert parsed.precision == precision


@pytest.mark.parametrize(
    "spec",
    [
        "IVF",
        "BFlatx",
        "",
        " ",
        "flat",
        "HNSW",
        "SQ4",
        "HNSW32,SQ4",
        "BIVF",
        "Flat,SQ8",
        "HNSW32 SQ8",
        "IVF256,PQ8",
        "BHNSW32,SQ8",
    ],
)
def test_parse_spec_rejects_junk(spec):
    with pytest.raises(InvalidInputError):
        parse_spec(spec)
    with pytest.raises(InvalidInputError):
        VectorIndex(spec, DIM)


@pytest.mark.parametrize("spec", ["HNSW0", "HNSW1", "BHNSW0", "BHNSW1", "BIVF0", "HNSW1,SQ8"])
def test_parse_spec_rejects_degenerate_parameters(spec):
    """FAISS aborts (HNSW0) or segfaults (HNSW1, BHNSW1) on these; they must be refused up front."""
    with pytest.raises(InvalidInputError):
        parse_spec(spec)


def test_constructor_validation():
    with pytest.raises(DimensionMismatchError):
        VectorIndex("BFlat", 12)  # binary codes need a multiple of 8
    with pytest.raises(DimensionMismatchError):
        VectorIndex("Flat", 0)
    with pytest.raises(InvalidInputError):
        VectorIndex("Flat", DIM, rescore_with="float16")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rescore_with", "float16", "unknown rescore_with 'float16': use float32 or int8"),
        ("rescore_with", None, "unknown rescore_with None: use float32 or int8"),
        ("binary_method", "pca", "unknown binary_method 'pca': use itq, mean or none"),
        ("adaptor", "PCA", "unknown adaptor 'PCA': use none, pca or learned"),
        ("scan", "gpu", "unknown scan 'gpu': use faiss or kernel"),
    ],
)
def test_options_are_refused_at_construction_with_the_accepted_values(option, value, message):
    with pytest.raises(InvalidInputError) as err:
        VectorIndex("BFlat", DIM, **{option: value})
    assert str(err.value) == message


def test_options_are_str_enums_equal_to_their_strings():
    vi = VectorIndex("HNSW8,SQ8", DIM, rescore_with="int8", binary_method="mean", adaptor="pca")
    assert vi.spec.family is Family.HNSW_SQ8 and vi.spec.family == "hnsw_sq8"
    assert vi.spec.precision is Precision.INT8 and vi.spec.precision == "int8"
    assert vi.rescore_with is RescoreCodec.INT8 and vi.rescore_with == "int8"
    assert vi.binary_method is BinaryMethod.MEAN and vi.adaptor_method is AdaptorMethod.PCA
    assert vi.scan is ScanMode.FAISS and vi.scan == "faiss"
    # they format, hash and serialise as the plain strings callers and manifests use
    assert f"{vi.spec.precision}" == "int8" and {"int8": 1}[vi.spec.precision] == 1
    assert json.dumps([vi.spec.precision, vi.rescore_with]) == '["int8", "int8"]'
    assert parse_spec("BIVF4").precision is Precision.UBINARY


@pytest.mark.parametrize(
    ("spec", "strategy"),
    [
        ("Flat", FloatStrategy),
        ("HNSW32", FloatStrategy),
        ("SQ8", Int8Strategy),
        ("HNSW16,SQ8", Int8Strategy),
        ("BFlat", BinaryStrategy),
        ("BHNSW32", BinaryStrategy),
        ("BIVF16", BinaryStrategy),
    ],
)
def test_each_precision_has_its_strategy(spec, strategy):
    vi = VectorIndex(spec, DIM)
    assert type(vi._family) is strategy and STRATEGIES[vi.spec.precision] is strategy
    assert vi.spec.family in strategy.families and vi.index is vi._family.index
    assert vi._family.precision is vi.spec.precision


# --- search quality -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_recall_of_source_vector_and_exact_rescored_scores(spec, data, shared):
    vi = shared(spec)
    assert vi.ntotal == NB
    rescore = 1 if spec == "Flat" else 4
    scores, ids = vi.search(data.xq, 5, rescore=rescore)
    assert scores.shape == ids.shape == (NQ, 5)
    recall = np.mean(ids[:, 0] == data.ids[data.src])
    if spec == "Flat":
        assert recall == 1.0
    else:
        assert recall >= 0.95, f"{spec} recall@1 {recall:.3f}"
    assert (ids >= 0).all()
    assert np.isin(ids, data.ids).all()
    # Flat scores, and any scores rescored against the float32 store, are exact inner products
    np.testing.assert_allclose(scores, data.dots(data.xq, ids), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "scores must be sorted best first"


def test_flat_equals_brute_force(data, shared):
    scores, ids = shared("Flat").search(data.xq, 10)
    expected_scores, expected_ids = data.exact(data.xq, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_flat_with_rescore_equals_brute_force(data, shared):
    scores, ids = shared("Flat").search(data.xq, 10, rescore=3)
    expected_scores, expected_ids = data.exact(data.xq, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_queries_are_normalised_and_may_be_one_dimensional(data, shared):
    vi = shared("Flat")
    s_ref, i_ref = vi.search(data.xq[:5], 3)
    s_big, i_big = vi.search(7.5 * data.xq[:5], 3)
    np.testing.assert_array_equal(i_big, i_ref)
    np.testing.assert_allclose(s_big, s_ref, atol=1e-6)
    s_one, i_one = vi.search(data.xq[0], 3)
    np.testing.assert_array_equal(i_one, i_ref[:1])
    np.testing.assert_allclose(s_one, s_ref[:1], atol=1e-6)


def test_sq8_scores_without_rescoring_are_close(data, shared):
    scores, ids = shared("SQ8").search(data.xq, 5)
    assert np.mean(ids[:, 0] == data.ids[data.src]) >= 0.95
    np.testing.assert_allclose(scores, data.dots(data.xq, ids), atol=0.02)


@pytest.mark.parametrize("spec", ["BFlat", "BHNSW32", "BIVF16"])
def test_binary_scores_without_rescoring_are_hamming_similarities(spec, data, shared):
    vi = shared(spec)
    queries = data.xq[:50]
    scores, ids = vi.search(queries, 10)
    codes_q = quantize_ubinary(queries, vi.binary)
    codes_b = quantize_ubinary(data.xb, vi.binary)
    ham = np.unpackbits(codes_q[:, None, :] ^ codes_b[None, :, :], axis=-1).sum(axis=-1)  # (50, NB)
    returned = np.take_along_axis(ham, data.row_of(ids), axis=1)
    np.testing.assert_allclose(scores, 1.0 - 2.0 * returned / DIM, atol=1e-6)
    if spec == "BFlat":  # exhaustive: the k smallest Hamming distances (ids may differ on ties)
        np.testing.assert_array_equal(returned, np.sort(ham, axis=1)[:, :10])


@pytest.mark.parametrize("spec", ["Flat", "HNSW32", "BFlat"])
def test_int8_rescoring_scores_close_to_float(spec, data):
    vi = fast(spec, data, rescore_with="int8")
    assert vi.int8 is not None and vi.codes is not None
    np.testing.assert_array_equal(vi.codes.array(), quantize_int8(vi.floats.array(), vi.int8))
    scores, ids = vi.search(data.xq, 5, rescore=4)
    assert np.mean(ids[:, 0] == data.ids[data.src]) >= 0.95
    exact = data.dots(data.xq, ids)
    np.testing.assert_allclose(scores, exact, atol=0.02)
    assert np.abs(scores - exact).max() > 0, "int8 rescoring should not be bit-exact float32"


def test_empty_index_returns_padding(data):
    scores, ids = VectorIndex("Flat", DIM).search(data.xq[:2], 3)
    np.testing.assert_array_equal(ids, np.full((2, 3), -1))
    assert np.isneginf(scores).all()


# --- add / remove -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", REMOVABLE + TOMBSTONED)
def test_remove_then_search_never_returns_removed_ids(spec, data):
    vi = fast(spec, data)
    gone = data.ids[data.src[:50]]  # the sources of the first 50 queries
    assert vi.remove(np.concatenate([gone, [999_999_993]])) == 50  # unknown ids are ignored
    assert vi.remove(gone) == 0
    assert vi.ntotal == NB - 50

    for rescore in (1, 4):  # without rescoring the deleted sources would be the raw top-1 candidates
        _, ids = vi.search(data.xq, 10, rescore=rescore)
        assert not np.isin(ids, gone).any()
        assert (ids >= 0).all(), f"deleted vectors must not eat into k (rescore={rescore})"
    scores, ids = vi.search(data.xq, 10, rescore=4)
    assert np.mean(ids[50:, 0] == data.ids[data.src[50:]]) >= 0.95
    if spec == "Flat":
        keep = np.setdiff1d(np.arange(NB), data.src[:50])
        expected_scores, expected_ids = data.exact(data.xq, 10, keep)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    _, ids = vi.search(data.xq[:5], 3, allowed_ids=gone)
    np.testing.assert_array_equal(ids, np.full((5, 3), -1))

    # a removed id can be added again (as a new row) and is found again
    vi.add(gone, data.vectors_of(gone))
    assert vi.ntotal == NB
    scores, ids = vi.search(data.xq[:50], 1, rescore=4)
    assert np.mean(ids[:, 0] == gone) >= 0.95
    with pytest.raises(InvalidInputError):
        vi.add(gone[:1], data.vectors_of(gone[:1]))  # present again


@pytest.mark.parametrize("spec", REMOVABLE + TOMBSTONED)
def test_removing_everything_leaves_an_empty_result(spec, data):
    vi = fast(spec, data, rows=slice(0, 100))
    assert vi.remove(data.ids[:100]) == 100
    assert vi.ntotal == 0
    scores, ids = vi.search(data.xq[:3], 5, rescore=2)
    np.testing.assert_array_equal(ids, np.full((3, 5), -1))
    assert np.isneginf(scores).all()


@pytest.mark.parametrize("spec", ["Flat", "BHNSW32"])
def test_add_and_search_validation(spec, data):
    vi = fast(spec, data, rows=slice(0, 100))
    with pytest.raises(InvalidInputError):
        vi.add(data.ids[5:6], data.xb[5:6])  # already present
    with pytest.raises(InvalidInputError):
        vi.add([data.ids[200], 7, data.ids[200]], data.xb[:3])  # repeated within the batch
    with pytest.raises(InvalidInputError):
        vi.add([-1], data.xb[:1])
    with pytest.raises(InvalidInputError):
        vi.add([7, 8], data.xb[:1])  # 2 ids, 1 vector
    with pytest.raises(DimensionMismatchError):
        vi.add([7], data.xb[:1, :32])
    with pytest.raises(DimensionMismatchError):
        vi.search(data.xq[:1, :32], 1)
    with pytest.raises(InvalidInputError):
        vi.search(data.xq[:1], 0)
    with pytest.raises(InvalidInputError):
        vi.search(data.xq[:1], 1, rescore=0)
    # failed calls changed nothing
    assert vi.ntotal == 100 and len(vi.row_ids) == 100 and vi.index.ntotal == 100 and vi.floats.count == 100
    vi.add([7], data.xb[200:201])
    _, ids = vi.search(data.xb[200:201], 1, rescore=4)
    assert ids[0, 0] == 7


def test_bivf_needs_enough_training_vectors(data):
    with pytest.raises(InvalidInputError):
        fast("BIVF16", data, rows=slice(0, 8))


def test_first_small_batch_into_binary_index(data):
    """ITQ is fitted on the first batch; fewer vectors than dimensions must still work."""
    vi = VectorIndex("BFlat", DIM)  # default ITQ calibration
    vi.add(data.ids[:10], data.xb[:10])
    np.testing.assert_allclose(vi.binary.rotation.T @ vi.binary.rotation, np.eye(DIM), atol=1e-4)
    _, ids = vi.search(data.xb[:10], 1, rescore=4)
    np.testing.assert_array_equal(ids[:, 0], data.ids[:10])


# --- allowed_ids (metadata filters) --------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_allowed_ids_equals_brute_force_over_subset(spec, data, shared):
    rows = np.random.default_rng(5).choice(NB, 300, replace=False)
    allowed = data.ids[rows]
    scores, ids = shared(spec).search(data.xq, 10, allowed_ids=allowed)
    assert np.isin(ids, allowed).all()
    expected_scores, expected_ids = data.exact(data.xq, 10, rows)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_allowed_ids_pads_with_minus_one(data, shared):
    vi = shared("Flat")
    allowed = np.array([data.ids[7], 5, data.ids[11], 123_456_789])  # two real ids, two unknown ones
    scores, ids = vi.search(data.xq[:3], 5, allowed_ids=allowed)
    expected_scores, expected_ids = data.exact(data.xq[:3], 2, np.array([7, 11]))
    np.testing.assert_array_equal(ids[:, :2], expected_ids)
    np.testing.assert_allclose(scores[:, :2], expected_scores, atol=1e-6)
    np.testing.assert_array_equal(ids[:, 2:], np.full((3, 3), -1))
    assert np.isneginf(scores[:, 2:]).all()

    scores, ids = vi.search(data.xq[:2], 4, allowed_ids=np.array([], dtype=np.int64))
    np.testing.assert_array_equal(ids, np.full((2, 4), -1))
    assert np.isneginf(scores).all()


def test_allowed_ids_with_duplicates_returns_each_id_once(data, shared):
    allowed = np.array([data.ids[7], data.ids[7], data.ids[11]])
    _, ids = shared("Flat").search(data.xq[:1], 3, allowed_ids=allowed)
    assert sorted(ids[0].tolist()) == sorted([-1, data.ids[7], data.ids[11]])


# --- save / load --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trip(spec, data, tmp_path):
    vi = fast(spec, data, encoder="test/encoder")
    assert vi.remove(data.ids[:5]) == 5  # the saved state includes deletions
    before = vi.search(data.xq, 10, rescore=4)

    folder = vi.save(tmp_path / "idx")
    assert folder == tmp_path / "idx"
    m = read_manifest(folder)
    assert file_names(folder) == referenced_files(folder)
    assert data_file(folder, "vectors").stat().st_size == NB * DIM * 4
    assert m["spec"] == spec and m["precision"] == parse_spec(spec).precision and m["dim"] == DIM
    assert m["rows"] == NB and m["live"] == NB - 5 and m["generation"] == 1
    assert (
        m["encoder"] == "test/encoder" and m["rescore_with"] == "float32" and m["metric"] == "inner_product"
    )
    assert m["files"]["codes"] is None and all(m["files"][key] for key in ("index", "ids", "vectors"))
    if m["precision"] == "int8":
        np.testing.assert_array_equal(np.asarray(m["int8"]["lo"], np.float32), vi.int8.lo)
        np.testing.assert_array_equal(np.asarray(m["int8"]["hi"], np.float32), vi.int8.hi)
    else:
        assert m["int8"] is None
    if m["precision"] == "ubinary":
        assert m["binary"]["method"] == "mean" and m["binary"]["rotation"] is None
        np.testing.assert_allclose(m["binary"]["mean"], data.xb.mean(axis=0), atol=1e-6)
    else:
        assert m["binary"] is None

    loaded = VectorIndex.load(folder)
    if loaded.spec.family == "bivf":
        loaded.nprobe = loaded.spec.param
    assert (loaded.spec, loaded.dim, loaded.encoder, loaded.ntotal) == (vi.spec, DIM, "test/encoder", NB - 5)
    np.testing.assert_array_equal(loaded.row_ids, vi.row_ids)
    assert isinstance(loaded.floats.array(), np.memmap)
    np.testing.assert_allclose(loaded.floats.array(), data.xb, atol=1e-6)
    after = loaded.search(data.xq, 10, rescore=4)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    after_plain = loaded.search(data.xq, 10)
    np.testing.assert_array_equal(after_plain[1], vi.search(data.xq, 10)[1])


@pytest.mark.parametrize("spec", ["Flat", "HNSW32", "BIVF16"])
def test_load_add_save_again_removes_older_generations(spec, data, tmp_path):
    folder = tmp_path / "idx"
    fast(spec, data, rows=slice(0, 1500)).save(folder)
    for generation, end in ((2, 1750), (3, 2000)):
        previous = read_manifest(folder)["files"]
        vi = VectorIndex.load(folder)
        assert isinstance(vi.floats.array(), np.memmap)
        vi.add(data.ids[end - 250 : end], data.xb[end - 250 : end])
        assert vi.save() == folder  # defaults to where it was loaded from
        m = read_manifest(folder)
        assert (m["generation"], m["rows"], m["live"]) == (generation, end, end)
        assert m["files"]["index"] != previous["index"] and m["files"]["ids"] != previous["ids"]
        assert not (folder / previous["index"]).exists() and not (folder / previous["ids"]).exists()
        assert file_names(folder) == referenced_files(folder), "older generation files must be removed"
        assert data_file(folder, "vectors").stat().st_size == end * DIM * 4

    loaded = VectorIndex.load(folder)
    if loaded.spec.family == "bivf":
        loaded.nprobe = loaded.spec.param
    assert loaded.ntotal == NB
    np.testing.assert_array_equal(loaded.row_ids, data.ids)
    np.testing.assert_allclose(loaded.floats.array(), data.xb, atol=1e-6)
    scores, ids = loaded.search(data.xq, 5, rescore=4)
    assert np.mean(ids[:, 0] == data.ids[data.src]) >= 0.95
    np.testing.assert_allclose(scores, data.dots(data.xq, ids), atol=1e-5)
    if spec == "Flat":
        np.testing.assert_array_equal(ids, data.exact(data.xq, 5)[1])


def test_itq_rotation_and_int8_codes_survive_save_load(data, tmp_path):
    vi = build("BFlat", data, rows=slice(0, 500), rescore_with="int8")  # default ITQ calibration
    assert vi.binary.rotation is not None
    before = vi.search(data.xq, 5, rescore=4)
    folder = vi.save(tmp_path / "idx")
    m = read_manifest(folder)
    assert m["binary"]["method"] == "itq" and m["binary"]["rotation"]
    assert m["files"]["codes"] and m["rescore_with"] == "int8"
    assert file_names(folder) == referenced_files(folder)
    np.testing.assert_array_equal(np.load(folder / m["binary"]["rotation"]), vi.binary.rotation)
    assert data_file(folder, "codes").stat().st_size == 500 * DIM

    loaded = VectorIndex.load(folder)
    np.testing.assert_array_equal(loaded.binary.rotation, vi.binary.rotation)
    np.testing.assert_array_equal(loaded.binary.mean, vi.binary.mean)
    np.testing.assert_array_equal(loaded.int8.lo, vi.int8.lo)
    assert isinstance(loaded.codes.array(), np.memmap)
    np.testing.assert_array_equal(loaded.codes.array(), vi.codes.array())
    after = loaded.search(data.xq, 5, rescore=4)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_refitted_rotation_is_saved_under_a_new_name(data, tmp_path):
    """Calibrating a loaded binary index again changes its rotation: the next save must write it, not
    keep naming the previous generation's file."""
    folder = build("BFlat", data, rows=slice(0, 300)).save(tmp_path / "idx")
    vi = VectorIndex.load(folder)
    first = read_manifest(folder)["binary"]["rotation"]
    vi.fit(data.xb[300:600])
    vi.save()
    m = read_manifest(folder)
    assert m["binary"]["rotation"] != first and not (folder / first).exists()
    np.testing.assert_array_equal(VectorIndex.load(folder).binary.rotation, vi.binary.rotation)
    assert file_names(folder) == referenced_files(folder)


@pytest.mark.parametrize("fail_at", ["write_with", "write_npy", "write_json"])
def test_interrupted_save_keeps_the_previous_generation(fail_at, data, tmp_path):
    """A save that dies before the manifest is replaced (index file, ids file or manifest write) must
    leave the previous generation readable and unchanged; the next save then succeeds and cleans up."""
    folder = tmp_path / "idx"
    fast("Flat", data, rows=slice(0, 1000)).save(folder)
    vi = VectorIndex.load(folder)
    before = vi.search(data.xq, 5)
    vi.add(data.ids[1000:1500], data.xb[1000:1500])
    with (
        mock.patch.object(persist_module, fail_at, side_effect=OSError("simulated crash")),
        pytest.raises(OSError, match="simulated crash"),
    ):
        vi.save()

    old = VectorIndex.load(folder)
    assert old.ntotal == 1000 and old.generation == 1
    np.testing.assert_array_equal(old.row_ids, data.ids[:1000])
    np.testing.assert_allclose(old.floats.array(), data.xb[:1000], atol=1e-6)
    after = old.search(data.xq, 5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)

    vi.save()
    new = VectorIndex.load(folder)
    assert new.ntotal == 1500
    assert file_names(folder) == referenced_files(folder), "files of the failed save must be cleaned up"
    np.testing.assert_array_equal(new.search(data.xq, 5)[1], data.exact(data.xq, 5, np.arange(1500))[1])


def test_interrupted_save_of_a_new_index_over_an_old_one(data, tmp_path):
    """Saving a different index into an occupied folder must not touch files the old manifest names."""
    folder = tmp_path / "idx"
    fast("Flat", data, rows=slice(0, 500)).save(folder)
    replacement = fast("Flat", data, rows=slice(500, 1500))
    with (
        mock.patch.object(persist_module, "write_json", side_effect=OSError("simulated crash")),
        pytest.raises(OSError),
    ):
        replacement.save(folder)
    old = VectorIndex.load(folder)  # generation 1: 500 rows
    assert old.ntotal == 500
    np.testing.assert_allclose(old.floats.array(), data.xb[:500], atol=1e-6)


# --- corruption ---------------------------------------------------------------------------------


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        m = read_manifest(folder)
        for key, value in changes.items():
            if value is None:
                m.pop(key)
            else:
                m[key] = value
        (folder / MANIFEST).write_text(json.dumps(m))

    return edit


def _truncate(key: str, keep: float) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        path = data_file(folder, key)
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return cut


def _garbage(key: str) -> Callable[[Path], None]:
    def scribble(folder: Path) -> None:
        path = folder / MANIFEST if key == "manifest" else data_file(folder, key)
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    return scribble


def _delete(key: str) -> Callable[[Path], None]:
    def delete(folder: Path) -> None:
        (folder / MANIFEST if key == "manifest" else data_file(folder, key)).unlink()

    return delete


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage manifest": _garbage("manifest"),
    "manifest not json": lambda f: (f / MANIFEST).write_text('{"spec": "Flat", '),
    "manifest not an object": lambda f: (f / MANIFEST).write_text("[1, 2, 3]\n"),
    "missing manifest": _delete("manifest"),
    "manifest of another format version": _edit_manifest(format_version=99),
    "manifest without files": _edit_manifest(files=None),
    "manifest with a junk spec": _edit_manifest(spec="IVF"),
    "manifest with a non-numeric row count": _edit_manifest(rows="many"),
    "garbage index": _garbage("index"),
    "truncated index": _truncate("index", 0.5),
    "empty index": _truncate("index", 0.0),
    "missing index": _delete("index"),
    "truncated vectors": _truncate("vectors", 0.5),
    "missing vectors": _delete("vectors"),
    "garbage ids": _garbage("ids"),
    "ids of the wrong length": lambda f: np.save(data_file(f, "ids"), np.arange(7, dtype=np.int64)),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("spec", ["Flat", "BFlat"])
def test_corrupt_files_raise_corrupt_index_error(spec, corruption, data, tmp_path):
    folder = fast(spec, data, rows=slice(0, 200)).save(tmp_path / "idx")
    VectorIndex.load(folder)  # intact: loads
    CORRUPTIONS[corruption](folder)
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(folder)


def test_missing_directory_raises_corrupt_index_error(tmp_path):
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(tmp_path / "nowhere")
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(tmp_path)  # exists, but empty


def test_manifest_dim_disagreeing_with_index_is_corrupt(data, tmp_path):
    folder = fast("Flat", data, rows=slice(0, 200)).save(tmp_path / "idx")
    _edit_manifest(dim=32)(folder)
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(folder)


# --- crash safety -------------------------------------------------------------------------------

CRASH_DIM = 32  # crash_child.DIM
CRASH_BATCH = 2000  # crash_child.BATCH
CRASH_INITIAL = 300


@pytest.mark.parametrize("spec", ["Flat", "BFlat"])
def test_sigkilled_writer_leaves_a_loadable_index(spec, tmp_path):
    """Kill a process that loops add(2000) + save() at random moments: the folder must always load, hold
    the initial vectors plus a whole number of batches, and include every save() that had returned."""
    folder = tmp_path / "idx"
    known = normalize(np.random.default_rng(3).standard_normal((CRASH_INITIAL, CRASH_DIM)))
    known_ids = 10 * np.arange(CRASH_INITIAL) + 3
    vi = VectorIndex(spec, CRASH_DIM)
    vi.add(known_ids, known)
    vi.save(folder)

    delays = random.Random(20240607)
    committed = CRASH_INITIAL
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, str(CRASH_CHILD), str(folder), spec],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = child.stdout.readline()
            assert ready.startswith("ready"), child.stderr.read()
            assert int(ready.split()[1]) == committed
            time.sleep(delays.uniform(0.2, 1.5))
        finally:
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        saves = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]

        loaded = VectorIndex.load(folder)
        assert (loaded.ntotal - CRASH_INITIAL) % CRASH_BATCH == 0
        last_returned = saves[-1] if saves else committed
        # every save() that returned is durable; at most one more may have committed before the kill
        assert loaded.ntotal in (last_returned, last_returned + CRASH_BATCH), (loaded.ntotal, saves)
        assert len(loaded.row_ids) == loaded.ntotal
        np.testing.assert_array_equal(loaded.row_ids[:CRASH_INITIAL], known_ids)
        new_ids = loaded.row_ids[CRASH_INITIAL:]
        np.testing.assert_array_equal(new_ids, np.arange(len(new_ids)) + known_ids[-1] + 1)
        np.testing.assert_allclose(loaded.floats.array()[:CRASH_INITIAL], known, atol=1e-6)
        scores, ids = loaded.search(known[:1], 1, rescore=8)
        assert ids[0, 0] == known_ids[0]
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        committed = loaded.ntotal
    assert committed > CRASH_INITIAL, "the writer never completed a save: the test exercised nothing"
