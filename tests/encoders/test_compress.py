"""Tests for encoders.compress: Matryoshka truncation, int8 codes, packed binary codes and calibration.

Synthetic data only (seeded gaussians, in the spirit of faiss contrib/datasets.py SyntheticDataset):
every expectation is either a hand-computed value or a brute-force numpy ground truth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvrag.encoders.compress import (
    BinaryCalibration,
    Int8Calibration,
    dequantize_int8,
    normalize,
    quantize_int8,
    quantize_ubinary,
    truncate,
)
from kvrag.errors import DimensionMismatchError, InvalidInputError

DIM = 64
OFFSET = 3.0  # a large component shared by every vector, like the common direction of e5 embeddings


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    """2000 seeded 64-dim gaussian vectors (not normalised)."""
    return np.random.default_rng(0).standard_normal((2000, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def offset_data() -> tuple[np.ndarray, np.ndarray]:
    """(database, queries): gaussian + 3.0 * ones, so raw signs are almost all positive."""
    rng = np.random.default_rng(42)
    xb = (rng.standard_normal((2000, DIM)) + OFFSET).astype(np.float32)
    xq = (rng.standard_normal((100, DIM)) + OFFSET).astype(np.float32)
    return xb, xq


@pytest.fixture(scope="module")
def calibrations(offset_data) -> dict[str, BinaryCalibration]:
    """One fit per method on the offset database (ITQ is the slow one: fit it once)."""
    xb, _ = offset_data
    return {method: BinaryCalibration.fit(xb, method) for method in ("none", "mean", "itq")}


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances between packed codes a (n, B) and b (m, B) -> (n, m)."""
    return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=-1).sum(axis=-1)


# --- truncate -----------------------------------------------------------------------------------


def test_truncate_keeps_first_dims_and_renormalises():
    x = np.array([[3.0, 4.0, 12.0, 0.0], [0.0, 2.0, 0.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate(x, 2), [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(truncate(x, 1), [[1.0], [0.0]], atol=1e-7)  # zero rows stay zero
    np.testing.assert_allclose(
        truncate(x, None), [[3 / 13, 4 / 13, 12 / 13, 0.0], [0.0, 2 / 29**0.5, 0.0, 5 / 29**0.5]], atol=1e-7
    )
    np.testing.assert_allclose(truncate(x, 4), truncate(x, None))
    assert truncate(x, 2).dtype == np.float32


def test_truncate_matches_numpy_on_random_vectors(gaussian):
    out = truncate(gaussian, 16)
    expected = gaussian[:, :16] / np.linalg.norm(gaussian[:, :16], axis=1, keepdims=True)
    assert out.shape == (len(gaussian), 16)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("dim", [0, -1, DIM + 1])
def test_truncate_rejects_bad_dim(gaussian, dim):
    with pytest.raises(DimensionMismatchError):
        truncate(gaussian, dim)


# --- int8 ---------------------------------------------------------------------------------------


def test_int8_fit_uses_per_dimension_ranges(gaussian):
    calib = Int8Calibration.fit(gaussian)
    np.testing.assert_array_equal(calib.lo, gaussian.min(axis=0))
    np.testing.assert_array_equal(calib.hi, gaussian.max(axis=0))
    np.testing.assert_allclose(calib.scale, (gaussian.max(axis=0) - gaussian.min(axis=0)) / 255.0, rtol=1e-6)


def test_int8_round_trip_within_one_step(gaussian):
    calib = Int8Calibration.fit(gaussian)
    codes = quantize_int8(gaussian, calib)
    assert codes.dtype == np.int8 and codes.shape == gaussian.shape
    err = np.abs(dequantize_int8(codes, calib) - gaussian)
    # rounding to the nearest level: at most half a step, one step leaves room for float error
    assert (err <= calib.scale).all()
    assert (err <= 0.5 * calib.scale + 1e-6).mean() > 0.999
    # both ends of the calibrated range are used
    assert codes.min() == -128 and codes.max() == 127
    np.testing.assert_array_equal(quantize_int8(calib.lo[None], calib), np.full((1, DIM), -128))
    np.testing.assert_array_equal(quantize_int8(calib.hi[None], calib), np.full((1, DIM), 127))


def test_int8_clips_out_of_range_values(gaussian):
    calib = Int8Calibration.fit(gaussian)
    width = calib.hi - calib.lo
    above, below = (calib.hi + 10 * width)[None], (calib.lo - 10 * width)[None]
    np.testing.assert_array_equal(quantize_int8(above, calib), np.full((1, DIM), 127, dtype=np.int8))
    np.testing.assert_array_equal(quantize_int8(below, calib), np.full((1, DIM), -128, dtype=np.int8))
    np.testing.assert_allclose(
        dequantize_int8(quantize_int8(above, calib), calib)[0], calib.hi, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        dequantize_int8(quantize_int8(below, calib), calib)[0], calib.lo, rtol=1e-5, atol=1e-6
    )


def test_int8_hand_example():
    calib = Int8Calibration(
        np.array([0.0, -1.0], np.float32), np.array([2.55, 1.55], np.float32)
    )  # scale 0.01
    x = np.array([[0.0, -1.0], [1.0, 0.0], [2.55, 1.55], [0.004, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        quantize_int8(x, calib), [[-128, -128], [-28, -28], [127, 127], [-128, 127]]
    )


def test_int8_constant_dimension_does_not_divide_by_zero():
    x = np.zeros((10, 4), dtype=np.float32)
    x[:, 1] = np.linspace(-1, 1, 10)
    calib = Int8Calibration.fit(x)
    assert (calib.hi > calib.lo).all()
    recon = dequantize_int8(quantize_int8(x, calib), calib)
    assert np.isfinite(recon).all()
    np.testing.assert_allclose(recon, x, atol=0.01)


def test_int8_json_round_trip(gaussian):
    calib = Int8Calibration.fit(gaussian)
    data = json.loads(json.dumps(calib.to_json()))
    back = Int8Calibration.from_json(data)
    assert back.lo.dtype == np.float32 and back.hi.dtype == np.float32
    np.testing.assert_array_equal(back.lo, calib.lo)
    np.testing.assert_array_equal(back.hi, calib.hi)
    np.testing.assert_array_equal(quantize_int8(gaussian, back), quantize_int8(gaussian, calib))


def test_int8_errors(gaussian):
    with pytest.raises(InvalidInputError):
        Int8Calibration.fit(np.zeros((0, DIM), np.float32))
    with pytest.raises(InvalidInputError):
        Int8Calibration.fit(gaussian[0])
    calib = Int8Calibration.fit(gaussian)
    with pytest.raises(DimensionMismatchError):
        quantize_int8(gaussian[:, :32], calib)


# --- packed binary codes -------------------------------------------------------------------------


def test_ubinary_packs_sign_bits_most_significant_first():
    x = np.array(
        [
            [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.5, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0],
            [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, -3.0, 3.0, -3.0, 3.0, -3.0, 3.0, -3.0],
        ],
        dtype=np.float32,
    )
    codes = quantize_ubinary(x)
    expected = np.array(
        [[0b10000001, 0b00000000], [0b01111111, 0b10101010]], dtype=np.uint8
    )  # 0.0 is not > 0
    assert codes.dtype == np.uint8 and codes.shape == (2, 2)
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codes, np.packbits(x > 0, axis=-1))
    np.testing.assert_array_equal(np.unpackbits(codes, axis=-1).astype(bool), x > 0)


def test_ubinary_matches_numpy_with_calibration(gaussian, calibrations):
    calib = calibrations["itq"]
    codes = quantize_ubinary(gaussian, calib)
    assert codes.shape == (len(gaussian), DIM // 8)
    np.testing.assert_array_equal(codes, np.packbits(calib.transform(gaussian) > 0, axis=-1))


@pytest.mark.parametrize("dim", [12, 7, 65])
def test_ubinary_rejects_dims_not_multiple_of_8(dim):
    with pytest.raises(DimensionMismatchError):
        quantize_ubinary(np.ones((2, dim), np.float32))


# --- binary calibration -------------------------------------------------------------------------


def test_binary_none_keeps_raw_values(offset_data, calibrations):
    xb, _ = offset_data
    calib = calibrations["none"]
    assert calib.rotation is None
    np.testing.assert_array_equal(calib.mean, np.zeros(DIM))
    np.testing.assert_array_equal(calib.transform(xb), xb)


def test_binary_mean_centering_subtracts_mean(offset_data, calibrations):
    xb, xq = offset_data
    calib = calibrations["mean"]
    assert calib.rotation is None
    np.testing.assert_allclose(calib.mean, xb.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(calib.mean, OFFSET, atol=0.15)  # 2000 samples of N(3, 1)
    np.testing.assert_allclose(calib.transform(xq), xq - xb.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(calib.transform(xb).mean(axis=0), 0.0, atol=1e-5)
    assert calib.to_json() == {"mean": calib.mean.tolist(), "rotation": False}


def test_binary_itq_rotation_is_orthogonal(offset_data, calibrations):
    xb, xq = offset_data
    calib = calibrations["itq"]
    r = calib.rotation
    assert r is not None and r.shape == (DIM, DIM)
    np.testing.assert_allclose(r.T @ r, np.eye(DIM), atol=1e-4)
    np.testing.assert_allclose(r @ r.T, np.eye(DIM), atol=1e-4)
    np.testing.assert_allclose(calib.mean, xb.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(calib.transform(xq), (xq - xb.mean(axis=0)) @ r, atol=1e-4)
    # a rotation preserves distances between centred vectors
    np.testing.assert_allclose(
        np.linalg.norm(calib.transform(xq), axis=1), np.linalg.norm(xq - calib.mean, axis=1), rtol=1e-4
    )
    # ITQ is seeded: refitting gives the same rotation
    np.testing.assert_allclose(
        BinaryCalibration.fit(xb, "itq", iterations=2).rotation,
        BinaryCalibration.fit(xb, "itq", iterations=2).rotation,
        atol=1e-6,
    )


def test_binary_unknown_method_and_empty_input():
    with pytest.raises(InvalidInputError):
        BinaryCalibration.fit(np.ones((10, 8), np.float32), "pca")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        BinaryCalibration.fit(np.zeros((0, 8), np.float32), "mean")
    with pytest.raises(DimensionMismatchError):
        BinaryCalibration.fit(np.ones((10, 8), np.float32), "mean").transform(np.ones((2, 16), np.float32))


def test_centering_makes_hamming_neighbours_match_cosine_neighbours(offset_data, calibrations):
    """With a shared offset, raw signs are nearly constant; centring (and ITQ) restore neighbour recall."""
    xb, xq = offset_data
    cosine = normalize(xq) @ normalize(xb).T
    exact = np.argsort(-cosine, axis=1, kind="stable")[:, :10]

    def recall(method: str, candidates: int) -> float:
        calib = calibrations[method]
        dist = hamming(quantize_ubinary(xq, calib), quantize_ubinary(xb, calib))
        found = np.argsort(dist, axis=1, kind="stable")[:, :candidates]
        return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))

    r10 = {m: recall(m, 10) for m in calibrations}  # measured: none 0.006, mean 0.14, itq 0.15
    r100 = {m: recall(m, 100) for m in calibrations}  # measured: none 0.05, mean 0.50, itq 0.55
    assert r10["none"] < 0.03
    assert r10["mean"] > r10["none"] + 0.08 and r10["itq"] > r10["none"] + 0.08, r10
    assert r100["mean"] > r100["none"] + 0.3 and r100["itq"] > r100["none"] + 0.3, r100
    assert r100["itq"] > r100["mean"] - 0.05, r100  # ITQ is at least about as good as plain centring


def test_itq_with_fewer_vectors_than_dimensions(gaussian):
    """A small first batch (10 vectors, 64 dims) still gives a full orthogonal rotation."""
    few = gaussian[:10]
    calib = BinaryCalibration.fit(few, "itq")
    assert calib.transform(few).shape == (10, DIM)
    np.testing.assert_allclose(calib.rotation.T @ calib.rotation, np.eye(DIM), atol=1e-4)
