"""Embedding compression: Matryoshka truncation, calibrated int8 codes and packed binary codes.

Plain functions over float32 arrays, plus two small calibration records that are fitted on a
corpus, saved with an index, and applied to queries the same way as to passages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvrag.errors import DimensionMismatchError, InvalidInputError

Precision = Literal["float32", "int8", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "ubinary")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def truncate(x: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first `dim` components and re-normalise."""
    x = np.asarray(x, dtype=np.float32)
    if dim is None or dim == x.shape[-1]:
        return normalize(x)
    if not 0 < dim <= x.shape[-1]:
        raise DimensionMismatchError(
            f"cannot truncate {x.shape[-1]}-dim embeddings to {dim}: pick 1..{x.shape[-1]}"
        )
    return normalize(x[..., :dim])


@dataclass
class Int8Calibration:
    """Per-dimension value ranges fitted on a corpus; maps [lo, hi] onto the 256 int8 levels."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Int8Calibration:
        """Ranges from the corpus embeddings themselves (min and max per dimension)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise InvalidInputError("int8 calibration needs a non-empty 2-D array of embeddings")
        lo, hi = x.min(axis=0), x.max(axis=0)
        hi = np.where(hi - lo < 1e-6, lo + 1e-6, hi)
        return cls(lo.astype(np.float32), hi.astype(np.float32))

    @property
    def scale(self) -> np.ndarray:
        return (self.hi - self.lo) / 255.0

    def to_json(self) -> dict:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Int8Calibration:
        return cls(np.asarray(data["lo"], dtype=np.float32), np.asarray(data["hi"], dtype=np.float32))


def quantize_int8(x: np.ndarray, calib: Int8Calibration) -> np.ndarray:
    """float32 -> int8 codes; values outside the calibrated range are clipped."""
    x = np.asarray(x, dtype=np.float32)
    _check_dim(x, calib.lo.shape[0])
    q = np.rint((x - calib.lo) / calib.scale) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray, calib: Int8Calibration) -> np.ndarray:
    """int8 codes -> float32 approximations of the original values."""
    return (codes.astype(np.float32) + 128.0) * calib.scale + calib.lo


@dataclass
class BinaryCalibration:
    """Centering (and optionally a rotation) applied before taking signs.

    e5 embeddings share a large common component, so signs of raw values carry little; subtracting
    the corpus mean fixes most of that, and an ITQ rotation (PCA, then the orthogonal rotation that
    minimises the quantisation error, Gong & Lazebnik 2011) balances variance across bits.
    """

    mean: np.ndarray
    rotation: np.ndarray | None = None  # (dim, dim), applied as (x - mean) @ rotation

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        method: Literal["mean", "itq", "none"] = "itq",
        *,
        iterations: int = 100,
        seed: int = 0,
        max_samples: int = 20_000,
    ) -> BinaryCalibration:
        """Fit on corpus embeddings. `method="none"` keeps raw signs (for comparison only)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise InvalidInputError("binary calibration needs a non-empty 2-D array of embeddings")
        dim = x.shape[1]
        if method == "none":
            return cls(np.zeros(dim, dtype=np.float32))
        rng = np.random.default_rng(seed)
        if len(x) > max_samples:
            x = x[rng.choice(len(x), max_samples, replace=False)]
        mean = x.mean(axis=0).astype(np.float32)
        if method == "mean":
            return cls(mean)
        if method != "itq":
            raise InvalidInputError(f"unknown binary calibration {method!r}: use itq, mean or none")
        centered = (x - mean).astype(np.float64)
        # PCA basis (all `dim` components, by decreasing variance, even when there are fewer samples) ...
        eigvals, eigvecs = np.linalg.eigh(centered.T @ centered)
        pca = eigvecs[:, np.argsort(-eigvals)]
        v = centered @ pca
        # ... then ITQ: alternate binary codes B = sign(V R) and the Procrustes rotation R.
        r, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        for _ in range(iterations):
            b = np.sign(v @ r)
            b[b == 0] = 1
            u, _, wt = np.linalg.svd(v.T @ b)
            r = u @ wt
        return cls(mean, (pca @ r).astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The centred (and rotated) values whose signs become bits."""
        x = np.asarray(x, dtype=np.float32)
        _check_dim(x, self.mean.shape[0])
        y = x - self.mean
        return y @ self.rotation if self.rotation is not None else y

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "rotation": self.rotation is not None}


def quantize_ubinary(x: np.ndarray, calib: BinaryCalibration | None = None) -> np.ndarray:
    """float32 (n, dim) -> packed bits (n, dim/8) uint8, one bit per positive component."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % 8:
        raise DimensionMismatchError(f"binary codes need a dimension divisible by 8, got {x.shape[-1]}")
    y = calib.transform(x) if calib is not None else x
    return np.packbits(y > 0, axis=-1)


def _check_dim(x: np.ndarray, dim: int) -> None:
    if x.shape[-1] != dim:
        raise DimensionMismatchError(f"embeddings have dimension {x.shape[-1]}, calibration expects {dim}")
