"""Index specs and the option enums of a vector index, each validated once, where it enters.

The enums are `StrEnum`s: a member equals (and hashes like) the string it stands for, so manifests,
configs and callers that use the plain strings keep working, and JSON writes them as those strings.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Self

from kvrag.errors import InvalidInputError


class Choice(enum.StrEnum):
    """A closed set of option strings; `parse` turns a user's value into a member or refuses it.

    Subclasses name the option they stand for: `class Scan(Choice, option="scan")`."""

    def __init_subclass__(cls, *, option: str = "option", **kwargs):
        super().__init_subclass__(**kwargs)
        cls._option = option

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member equal to `value`; InvalidInputError naming the accepted values otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except (ValueError, TypeError):
            names = [str(m) for m in cls]
            accepted = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
            raise InvalidInputError(f"unknown {cls._option} {value!r}: use {accepted}") from None


class Family(Choice, option="index family"):
    """The FAISS structure of a spec."""

    FLAT = "flat"
    HNSW = "hnsw"
    SQ8 = "sq8"
    HNSW_SQ8 = "hnsw_sq8"
    BFLAT = "bflat"
    BHNSW = "bhnsw"
    BIVF = "bivf"


class Precision(Choice, option="precision"):
    """The codec of the codes a family's FAISS index holds and compares."""

    FLOAT32 = "float32"  # the unit vectors themselves, inner product
    INT8 = "int8"  # per-dimension calibrated 8-bit codes, float query against decoded codes
    UBINARY = "ubinary"  # packed sign bits (dim/8 bytes), Hamming distance


class RescoreCodec(Choice, option="rescore_with"):
    """The codec of the rows candidates are re-ranked against (`rescore_with`)."""

    FLOAT32 = "float32"
    INT8 = "int8"


class BinaryMethod(Choice, option="binary_method"):
    """How binary codes are calibrated before taking signs (`encoders.compress.BinaryCalibration`)."""

    ITQ = "itq"  # mean centring, then the ITQ rotation
    MEAN = "mean"  # mean centring only
    NONE = "none"  # raw signs (for comparison only)


class AdaptorMethod(Choice, option="adaptor"):
    """The Matryoshka adaptor fitted on the corpus (`encoders.adaptor`), or none."""

    NONE = "none"
    PCA = "pca"
    LEARNED = "learned"


class ScanMode(Choice, option="scan"):
    """How a BFlat index finds its candidates: the FAISS scan or the Hamming top-k kernel."""

    FAISS = "faiss"
    KERNEL = "kernel"


PRECISION_OF: dict[Family, Precision] = {
    Family.FLAT: Precision.FLOAT32,
    Family.HNSW: Precision.FLOAT32,
    Family.SQ8: Precision.INT8,
    Family.HNSW_SQ8: Precision.INT8,
    Family.BFLAT: Precision.UBINARY,
    Family.BHNSW: Precision.UBINARY,
    Family.BIVF: Precision.UBINARY,
}
GRAPHS = frozenset({Family.HNSW, Family.HNSW_SQ8, Family.BHNSW})  # families whose param is HNSW's M
SCANS: tuple[str, ...] = tuple(ScanMode)

_SPEC_RE = re.compile(
    r"^(?:(?P<flat>Flat)|HNSW(?P<hnsw>\d+)(?P<hnsq>,SQ8)?|(?P<sq>SQ8)|(?P<bflat>BFlat)"
    r"|BHNSW(?P<bhnsw>\d+)|BIVF(?P<bivf>\d+))$"
)


@dataclass(frozen=True)
class IndexSpec:
    """A parsed spec string."""

    text: str
    family: Family
    param: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", Family.parse(self.family))

    @property
    def precision(self) -> Precision:
        return PRECISION_OF[self.family]


def parse_spec(spec: str) -> IndexSpec:
    """Parse an index spec; raises InvalidInputError listing the accepted forms."""
    parsed = _parse_spec(spec)
    if parsed.family in GRAPHS and not 2 <= parsed.param <= 512:
        raise InvalidInputError(f"{spec}: HNSW needs 2 <= M <= 512 (32 is a good default)")
    if parsed.family is Family.BIVF and not 1 <= parsed.param <= 1_000_000:
        raise InvalidInputError(f"{spec}: BIVF needs 1 to 1,000,000 lists (about sqrt(N) is a good start)")
    return parsed


def _parse_spec(spec: str) -> IndexSpec:
    # a spec is short; past that, a parameter's digits would be parsed as a huge int (or refused)
    m = _SPEC_RE.fullmatch(spec.strip()) if isinstance(spec, str) and len(spec) <= 64 else None
    if not m:
        raise InvalidInputError(
            f"unknown index spec {spec!r}: use Flat, HNSW<M>, SQ8, HNSW<M>,SQ8, BFlat, BHNSW<M> or BIVF<nlist>"
        )
    if m["flat"]:
        return IndexSpec(spec, Family.FLAT)
    if m["hnsw"]:
        return IndexSpec(spec, Family.HNSW_SQ8 if m["hnsq"] else Family.HNSW, int(m["hnsw"]))
    if m["sq"]:
        return IndexSpec(spec, Family.SQ8)
    if m["bflat"]:
        return IndexSpec(spec, Family.BFLAT)
    if m["bhnsw"]:
        return IndexSpec(spec, Family.BHNSW, int(m["bhnsw"]))
    return IndexSpec(spec, Family.BIVF, int(m["bivf"]))


def resolve_scan(spec: IndexSpec, device: str | None, scan: str | None) -> tuple[str, ScanMode]:
    """(device, scan) of an index: `scan=None` picks the kernel for BFlat on an available CUDA device
    and FAISS otherwise; the kernel is only offered for BFlat (the other binary indexes are not
    exhaustive scans)."""
    mode = ScanMode.parse(scan) if scan is not None else None
    if mode is ScanMode.KERNEL and spec.family is not Family.BFLAT:
        raise InvalidInputError(f"scan='kernel' serves BFlat indexes only, not {spec.text}")
    device = "cpu" if device is None else str(device)
    if spec.family is not Family.BFLAT or (device == "cpu" and mode is None):
        return device, mode or ScanMode.FAISS
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"unknown device {device!r} ({exc})") from exc
    if mode is None:
        mode = ScanMode.KERNEL if parsed.type == "cuda" and torch.cuda.is_available() else ScanMode.FAISS
    return device, mode


def calibrates_on_queries(adaptor: str, precision: str) -> bool:
    """Whether an index's calibration uses pseudo-queries (see `VectorIndex.fit`): with a Matryoshka
    adaptor or binary codes. Callers then give `add` the first batch's pseudo-query embeddings."""
    return adaptor != AdaptorMethod.NONE or precision == Precision.UBINARY
