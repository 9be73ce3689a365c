"""FAISS vector indexes described by a spec string, with compressed codes and rescoring.

Specs (faiss factory style; the spec is data: it is saved in the manifest and compared on load):

    Flat, HNSW32              float32 vectors, inner product
    SQ8, HNSW32,SQ8           int8 codes (ranges calibrated on the corpus); float query vs int8 codes
    BFlat, BHNSW32, BIVF256   packed binary codes (dim/8 bytes), Hamming distance

Every added vector is also appended to an on-disk float32 file (and, for `rescore_with="int8"`, an
int8 code file). Those files are memory-mapped, not loaded: they serve rescoring of binary/int8
candidates, exact search under metadata filters, and re-quantisation. FAISS labels are row numbers
(no id-map wrapper, so a binary index really costs dim/8 bytes a vector); `ids.npy` maps rows to the
caller's ids. Deleting marks the row in that map and searches skip marked rows with a FAISS
IDSelector, so neither adding nor deleting rebuilds the index.

The exhaustive scan of a `BFlat` index can run on the project's Hamming top-k kernel instead of
FAISS (`scan="kernel"`, the default when the index is given a CUDA `device`): the packed codes of the
live rows are then also kept as a torch tensor on that device, and `kernels.hamming_topk` answers the
candidate step. Both scans return the same rows in the same order (ascending Hamming distance, lower
row first on ties), so rescoring and results do not depend on the choice; it is not saved.

An optional Matryoshka adaptor (`adaptor="pca"|"learned"`, see `encoders.adaptor`) is fitted on the
first vectors added, saved as a generation file, and applied to added vectors and to queries alike:
the index then takes the encoder's full `input_dim` embeddings and stores their adapted, truncated
`dim`-dimensional versions (calibrations, codes and rescoring all work in that space).

Saving is crash-safe: data files of generation g+1 are written beside those of g, then the manifest
is atomically replaced; a crash at any point leaves generation g readable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import faiss
import numpy as np

from kvrag.atomic import fsync_dir, write_json, write_npy, write_with
from kvrag.encoders.adaptor import LearnedFit, MatryoshkaAdaptor, check_method
from kvrag.encoders.compress import (
    BinaryCalibration,
    Int8Calibration,
    dequantize_int8,
    normalize,
    quantize_int8,
    quantize_ubinary,
)
from kvrag.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError

if TYPE_CHECKING:  # torch is imported only when a kernel scan is used
    import torch

MANIFEST = "manifest.json"
_TEMP_FILE = re.compile(
    r"\.(index|ids|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8)\..+\.tmp"
)
_GENERATION_FILE = re.compile(r"(index|ids|vectors|codes|binary_rotation|adaptor)\.\d+\.(faiss|npy|f32|i8)")
FORMAT_VERSION = 1
SCANS: tuple[str, ...] = ("faiss", "kernel")
_SPEC_RE = re.compile(
    r"^(?:(?P<flat>Flat)|HNSW(?P<hnsw>\d+)(?P<hnsq>,SQ8)?|(?P<sq>SQ8)|(?P<bflat>BFlat)"
    r"|BHNSW(?P<bhnsw>\d+)|BIVF(?P<bivf>\d+))$"
)


@dataclass(frozen=True)
class IndexSpec:
    """A parsed spec string."""

    text: str
    family: Literal["flat", "hnsw", "sq8", "hnsw_sq8", "bflat", "bhnsw", "bivf"]
    param: int = 0

    @property
    def precision(self) -> str:
        if self.family in ("bflat", "bhnsw", "bivf"):
            return "ubinary"
        return "int8" if self.family in ("sq8", "hnsw_sq8") else "float32"


def resolve_scan(spec: IndexSpec, device: str | None, scan: str | None) -> tuple[str, str]:
    """(device, scan) of an index: `scan=None` picks the kernel for BFlat on an available CUDA device
    and FAISS otherwise; the kernel is only offered for BFlat (the other binary indexes are not
    exhaustive scans)."""
    if scan is not None and scan not in SCANS:
        raise InvalidInputError(f"scan must be one of {', '.join(SCANS)}, not {scan!r}")
    if scan == "kernel" and spec.family != "bflat":
        raise InvalidInputError(f"scan='kernel' serves BFlat indexes only, not {spec.text}")
    device = "cpu" if device is None else str(device)
    if spec.family != "bflat" or (device == "cpu" and scan is None):
        return device, scan or "faiss"
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"unknown device {device!r} ({exc})") from exc
    if scan is None:
        scan = "kernel" if parsed.type == "cuda" and torch.cuda.is_available() else "faiss"
    return device, scan


def parse_spec(spec: str) -> IndexSpec:
    """Parse an index spec; raises InvalidInputError listing the accepted forms."""
    parsed = _parse_spec(spec)
    if parsed.family in ("hnsw", "hnsw_sq8", "bhnsw") and not 2 <= parsed.param <= 512:
        raise InvalidInputError(f"{spec}: HNSW needs 2 <= M <= 512 (32 is a good default)")
    if parsed.family == "bivf" and not 1 <= parsed.param <= 1_000_000:
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
        return IndexSpec(spec, "flat")
    if m["hnsw"]:
        return IndexSpec(spec, "hnsw_sq8" if m["hnsq"] else "hnsw", int(m["hnsw"]))
    if m["sq"]:
        return IndexSpec(spec, "sq8")
    if m["bflat"]:
        return IndexSpec(spec, "bflat")
    if m["bhnsw"]:
        return IndexSpec(spec, "bhnsw", int(m["bhnsw"]))
    return IndexSpec(spec, "bivf", int(m["bivf"]))


class RowStore:
    """Append-only fixed-width rows, either in RAM or in a file that is memory-mapped for reads."""

    def __init__(self, dtype: str, dim: int, path: Path | None = None, count: int = 0):
        self.dtype, self.dim, self.path, self.count = np.dtype(dtype), dim, path, count
        self._ram: list[np.ndarray] = []
        self._map: np.ndarray | None = None
        if path is not None:
            size = path.stat().st_size if path.exists() else 0
            if size < count * self.row_bytes:
                raise CorruptIndexError(f"{path} holds fewer rows than the manifest says: rebuild the index")

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.path is None:
            self._ram.append(rows)
        else:
            mode = "r+b" if self.path.exists() else "w+b"
            with open(self.path, mode) as fh:
                # Bytes past `count` are left-overs of an append that was never saved: overwrite them.
                fh.seek(self.count * self.row_bytes)
                fh.write(rows.tobytes())
                fh.truncate()
            self._map = None
        self.count += len(rows)

    def array(self) -> np.ndarray:
        """All rows; a read-only memory map when file-backed."""
        if self.path is None:
            if len(self._ram) != 1:
                self._ram = [np.concatenate(self._ram) if self._ram else np.zeros((0, self.dim), self.dtype)]
            return self._ram[0]
        if self._map is None or len(self._map) != self.count:
            if self.count == 0:
                return np.zeros((0, self.dim), self.dtype)
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count, self.dim))
        return self._map

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array()[np.sort(rows)][np.argsort(np.argsort(rows))])

    def save_to(self, path: Path) -> None:
        """Make `path` hold exactly these rows (durably), and read from it from now on."""
        if self.path is not None and self.path.resolve() == path.resolve():
            with open(path, "r+b") as fh:
                fh.truncate(self.count * self.row_bytes)
                os.fsync(fh.fileno())
            return
        data = np.ascontiguousarray(self.array())
        write_with(path, lambda tmp: data.tofile(tmp))
        self.path, self._ram, self._map = path, [], None


def calibrates_on_queries(adaptor: str, precision: str) -> bool:
    """Whether an index's calibration uses pseudo-queries (see `VectorIndex.fit`): with a Matryoshka
    adaptor or binary codes. Callers then give `add` the first batch's pseudo-query embeddings."""
    return adaptor != "none" or precision == "ubinary"


class VectorIndex:
    """A FAISS index plus the row stores, calibrations and id map that make it a usable index."""

    def __init__(
        self,
        spec: str,
        dim: int,
        *,
        encoder: str = "",
        rescore_with: str = "float32",
        binary_method: str = "itq",
        device: str | None = None,
        scan: str | None = None,
        adaptor: str = "none",
        input_dim: int | None = None,
        learned: LearnedFit | None = None,
    ):
        """`device` and `scan` choose how a BFlat index scans its codes (see `resolve_scan`); other
        specs keep the FAISS search whatever the device. With an `adaptor`, vectors given to `add`
        and `search` have `input_dim` dimensions (None: fixed by the first vectors fitted on) and
        are adapted and truncated to `dim`; without one, `input_dim` is `dim`. `learned` sets the
        training options of a `learned` adaptor (not saved: they only matter while fitting)."""
        self.spec = parse_spec(spec)
        if dim <= 0 or (self.spec.precision == "ubinary" and dim % 8):
            raise DimensionMismatchError(
                f"dimension {dim} does not suit {spec}: binary codes need a multiple of 8"
            )
        if rescore_with not in ("float32", "int8"):
            raise InvalidInputError(f"rescore_with must be float32 or int8, not {rescore_with!r}")
        check_method(adaptor)
        if adaptor == "none" and input_dim not in (None, dim):
            raise DimensionMismatchError(
                f"input_dim {input_dim} differs from dim {dim}: that needs an adaptor"
            )
        if input_dim is not None and input_dim < dim:
            raise DimensionMismatchError(f"cannot truncate {input_dim}-dim embeddings to {dim} dimensions")
        self.adaptor_method, self.learned = adaptor, learned or LearnedFit()
        self.adaptor: MatryoshkaAdaptor | None = None
        self.input_dim: int | None = dim if adaptor == "none" else input_dim
        self.dim, self.encoder, self.rescore_with, self.binary_method = (
            dim,
            encoder,
            rescore_with,
            binary_method,
        )
        self.int8: Int8Calibration | None = None
        self.binary: BinaryCalibration | None = None
        self.index = self._new_faiss()
        self.row_ids = np.zeros(0, dtype=np.int64)
        self._row_of: dict[int, int] | None = None
        self._selector: tuple | None = None  # (IDSelectorNot, IDSelectorBatch) over deleted rows
        self.floats = RowStore("float32", dim)
        self.codes: RowStore | None = RowStore("int8", dim) if rescore_with == "int8" else None
        self.directory: Path | None = None
        self._files: dict[str, str] = {}  # names of the row-store and rotation files in `directory`
        self.generation = 0
        self.ef_search = 64
        self.nprobe = max(1, self.spec.param // 8) if self.spec.family == "bivf" else 1
        self.device, self.scan = resolve_scan(self.spec, device, scan)
        # Kernel scan: (codes of the live rows on `device`, their rows or None when every row is live).
        self._scan_codes: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- construction -------------------------------------------------------------------------
    def _new_faiss(self):
        s, d, ip = self.spec, self.dim, faiss.METRIC_INNER_PRODUCT
        if s.family == "flat":
            return faiss.IndexFlatIP(d)
        if s.family == "hnsw":
            return faiss.IndexHNSWFlat(d, s.param, ip)
        if s.family == "sq8":
            return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
        if s.family == "hnsw_sq8":
            return faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, s.param, ip)
        if s.family == "bflat":
            return faiss.IndexBinaryFlat(d)
        if s.family == "bhnsw":
            return faiss.IndexBinaryHNSW(d, s.param)
        quantizer = faiss.IndexBinaryFlat(d)
        ivf = faiss.IndexBinaryIVF(quantizer, d, s.param)
        ivf.own_fields = True
        quantizer.this.disown()
        return ivf

    @property
    def fitted(self) -> bool:
        needs_int8 = self.spec.precision == "int8" or self.rescore_with == "int8"
        needs_binary = self.spec.precision == "ubinary"
        needs_adaptor = self.adaptor_method != "none"
        return (
            (not needs_int8 or self.int8 is not None)
            and (not needs_binary or self.binary is not None)
            and (not needs_adaptor or self.adaptor is not None)
        )

    def fit(self, vectors: np.ndarray, queries: np.ndarray | None = None) -> None:
        """Calibrate on corpus vectors: the adaptor (while the index holds no rows), then int8
        ranges, binary centring/rotation and IVF centroids on the adapted vectors.

        `queries` (optional): pseudo-query embeddings paired row for row with `vectors`, in the same
        space (see `encoders.adaptor.pseudo_query`); the adaptor and the binary calibration are then
        fitted on passages and queries together, the adaptor's `learned` map on the pairs."""
        x = self._check(vectors)
        if len(x) == 0:
            raise InvalidInputError("cannot calibrate an index on zero vectors")
        q = None
        if queries is not None:
            q = self._check(queries)
            if q.shape != x.shape:
                raise InvalidInputError(
                    f"pseudo-queries {q.shape} must pair row for row with the vectors {x.shape}"
                )
        if self.adaptor_method != "none":
            if self.adaptor is None or len(self.row_ids) == 0:
                # the index's own dim is always among the trained truncations; binary codes search
                # on all of their bits, never on a prefix, so they train at the index's dim alone
                opts = self.learned
                if self.spec.precision == "ubinary":
                    opts = dataclasses.replace(opts, dims=(self.dim,), dim_weights=None)
                elif self.dim not in opts.dims:
                    weights = (*opts.weights(opts.dims, x.shape[1]), float(x.shape[1]) / self.dim)
                    opts = dataclasses.replace(opts, dims=(*opts.dims, self.dim), dim_weights=weights)
                self.adaptor = MatryoshkaAdaptor.fit(x, self.adaptor_method, queries=q, learned=opts)  # type: ignore[arg-type]
                self.input_dim = x.shape[1]
                self._files.pop("adaptor", None)
            x = self._prepare(x)
        q = self._prepare(q) if q is not None else None
        if self.spec.precision == "int8" or self.rescore_with == "int8":
            self.int8 = Int8Calibration.fit(x)
        if self.spec.precision == "int8":
            sq = self.index if self.spec.family == "sq8" else faiss.downcast_index(self.index.storage)
            faiss.copy_array_to_vector(
                np.concatenate([self.int8.lo, self.int8.hi - self.int8.lo]), sq.sq.trained
            )
            sq.is_trained = True
            self.index.is_trained = True
        if self.spec.precision == "ubinary":
            both = x if q is None else np.concatenate([x, q])
            self.binary = BinaryCalibration.fit(both, self.binary_method)  # type: ignore[arg-type]
            if self.spec.family == "bivf":
                if len(x) < self.spec.param:
                    raise InvalidInputError(
                        f"{self.spec.text} needs at least {self.spec.param} vectors to train"
                    )
                self.index.train(quantize_ubinary(x, self.binary))

    # -- data -----------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of live (not deleted) vectors."""
        return int((self.row_ids >= 0).sum())

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as a float32 2-D array of the width `add` and `search` take (`input_dim`)."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        expected = self.input_dim
        if x.ndim != 2 or (x.shape[1] != expected if expected is not None else x.shape[1] < self.dim):
            holds = (
                f"{self.dim}-dim vectors"
                if self.adaptor_method == "none"
                else f"{self.dim}-dim adapted vectors of {expected or 'full'}-dim embeddings ({self.adaptor_method} adaptor)"
            )
            raise DimensionMismatchError(
                f"vectors have shape {x.shape}, this index holds {holds}: use the encoder and "
                f"dim it was built with ({self.encoder or 'see manifest.json'})"
            )
        return x

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Checked input vectors -> the unit-norm `dim` vectors the index stores and compares."""
        if self.adaptor_method == "none":
            return normalize(x)
        if self.adaptor is None:
            raise InvalidInputError(
                "this index's adaptor is not fitted yet: add (or fit on) corpus vectors first"
            )
        return self.adaptor.transform(x, self.dim)

    def _rows_of(self) -> dict[int, int]:
        if self._row_of is None:
            live = np.flatnonzero(self.row_ids >= 0)
            self._row_of = dict(zip(self.row_ids[live].tolist(), live.tolist(), strict=True))
        return self._row_of

    def add(
        self, ids: np.ndarray | list[int], vectors: np.ndarray, *, fit_queries: np.ndarray | None = None
    ) -> None:
        """Add vectors under caller-chosen int64 ids (each id at most once; remove it first to replace).
        `fit_queries`: pseudo-queries paired with `vectors`, used only if this add calibrates the
        index (see `fit`)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = self._check(vectors)
        if len(ids) != len(x):
            raise InvalidInputError(f"{len(ids)} ids for {len(x)} vectors")
        if len(x) == 0:
            return
        if (ids < 0).any():
            raise InvalidInputError("ids must be non-negative")
        row_of = self._rows_of()
        dup = [i for i in ids.tolist() if i in row_of]
        if dup or len(np.unique(ids)) != len(ids):
            raise InvalidInputError(
                f"ids already present or repeated (e.g. {dup[:3] or ids[:3].tolist()}): remove them first"
            )
        if not self.fitted:
            self.fit(x if self.adaptor_method != "none" else normalize(x), fit_queries)
        x = self._prepare(x)
        start = len(self.row_ids)
        rows = np.arange(start, start + len(x), dtype=np.int64)
        if self.index.ntotal != self._faiss_rows():
            raise CorruptIndexError("the FAISS index and its id map disagree: rebuild the index")
        encoded = self._encode_for_index(x)
        if self.spec.family == "bivf":
            self.index.add_with_ids(encoded, rows)
        else:
            self.index.add(encoded)  # sequential labels == row numbers
        if self._scan_codes is not None:
            self._scan_append(encoded, rows)
        self.floats.append(x)
        if self.codes is not None:
            self.codes.append(quantize_int8(x, self.int8))
        self.row_ids = np.concatenate([self.row_ids, ids])
        row_of.update(zip(ids.tolist(), rows.tolist(), strict=True))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Delete vectors by id; unknown ids are ignored. Returns how many were removed."""
        row_of = self._rows_of()
        rows = np.array(
            [row_of.pop(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if i in row_of],
            dtype=np.int64,
        )
        if len(rows) == 0:
            return 0
        self.row_ids[rows] = -1
        if self.spec.family == "bivf":  # inverted lists store labels, so removal renumbers nothing
            self.index.remove_ids(rows)
        self._selector = None
        if self._scan_codes is not None:
            self._scan_drop(rows)
        return len(rows)

    def _faiss_rows(self) -> int:
        """How many entries the FAISS index should hold (binary IVF drops deleted ones)."""
        return self.ntotal if self.spec.family == "bivf" else len(self.row_ids)

    def _encode_for_index(self, x: np.ndarray) -> np.ndarray:
        return quantize_ubinary(x, self.binary) if self.spec.precision == "ubinary" else x

    # -- search ---------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, *, rescore: int = 1, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; ids are -1 where fewer than k vectors qualify.

        `rescore` > 1 fetches `rescore * k` candidates from the compressed index and re-ranks them by
        the float query against the stored float vectors (or int8 codes). `allowed_ids` restricts the
        search to those ids (metadata filters) and is answered exactly from the stored vectors.
        """
        q = self._check(queries)
        if k <= 0:
            raise InvalidInputError("k must be at least 1")
        if rescore < 1:
            raise InvalidInputError("rescore must be at least 1")
        if self.adaptor_method != "none" and self.adaptor is None:  # nothing was ever added
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        q = self._prepare(q)
        if allowed_ids is not None:
            return self._search_subset(q, k, np.asarray(allowed_ids, dtype=np.int64))
        fetch = min(k * rescore, self.ntotal)
        if fetch == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, rows = self._raw_search(q, fetch)
        if rescore > 1:
            scores = self._rescore(q, rows)
        return self._finish(scores, rows, k)

    def _params(self, n: int):
        """Per-call search parameters: graph/list breadth, and a selector skipping deleted rows."""
        if self._selector is None and self.ntotal < len(self.row_ids) and self.spec.family != "bivf":
            batch = faiss.IDSelectorBatch(np.flatnonzero(self.row_ids < 0).astype(np.int64))
            self._selector = (faiss.IDSelectorNot(batch), batch)
        if self.spec.family in ("hnsw", "hnsw_sq8", "bhnsw"):
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, n)
        elif self.spec.family == "bivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
        else:
            params = faiss.SearchParameters()
        if self._selector is not None:
            params.sel = self._selector[0]
        return params

    def _raw_search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.scan == "kernel":
            return self._kernel_search(q, n)
        params = self._params(n)
        if self.spec.precision == "ubinary":
            dist, rows = self.index.search(quantize_ubinary(q, self.binary), n, params=params)
            return (1.0 - 2.0 * dist.astype(np.float32) / self.dim), rows
        scores, rows = self.index.search(q, n, params=params)
        return scores.astype(np.float32), rows

    # -- kernel scan (BFlat) ----------------------------------------------------------------------
    def _kernel_search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`_raw_search` by the Hamming top-k kernel: what `IndexBinaryFlat` with the deleted-row
        selector returns (int32 max and -1 past the live rows), converted to the same scores."""
        import torch

        from kvrag.kernels.hamming_topk import PAD_DISTANCE, PAD_INDEX, hamming_topk

        codes, rows_of = self._live_codes()
        if len(codes) == 0:
            dist = np.full((len(q), n), PAD_DISTANCE, dtype=np.int32)
            rows = np.full((len(q), n), PAD_INDEX, dtype=np.int64)
        else:
            queries = torch.from_numpy(quantize_ubinary(q, self.binary)).to(codes.device)
            dist_t, pos = hamming_topk(queries, codes, n)
            if rows_of is not None:  # live positions -> rows; increasing, so ties keep their order
                pos = torch.where(pos >= 0, rows_of[pos.clamp(min=0)], pos)
            dist, rows = dist_t.cpu().numpy(), pos.cpu().numpy()
        return (1.0 - 2.0 * dist.astype(np.float32) / self.dim), rows

    def _live_codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The packed codes of the live rows on `device` (and their rows, None when no row is
        deleted): copied from the FAISS index on first use, then kept in step by add and remove."""
        if self._scan_codes is None or len(self._scan_codes[0]) != self.ntotal:
            import torch

            codes = self.index.reconstruct_n(0, self.index.ntotal)
            live = self.row_ids >= 0
            rows_of = None
            if not live.all():
                codes = codes[live]
                rows_of = torch.from_numpy(np.flatnonzero(live).astype(np.int64)).to(self.device)
            self._scan_codes = (torch.from_numpy(np.ascontiguousarray(codes)).to(self.device), rows_of)
        return self._scan_codes

    def _scan_append(self, encoded: np.ndarray, rows: np.ndarray) -> None:
        import torch

        codes, rows_of = self._scan_codes
        new = torch.from_numpy(np.ascontiguousarray(encoded)).to(codes.device)
        if rows_of is not None:
            rows_of = torch.cat([rows_of, torch.from_numpy(rows).to(rows_of.device)])
        self._scan_codes = (torch.cat([codes, new]), rows_of)

    def _scan_drop(self, rows: np.ndarray) -> None:
        import torch

        codes, rows_of = self._scan_codes
        if rows_of is None:  # every row was live: positions are rows
            rows_of = torch.arange(len(codes), dtype=torch.int64, device=codes.device)
        keep = ~torch.isin(rows_of, torch.from_numpy(rows).to(rows_of.device))
        self._scan_codes = (codes[keep], rows_of[keep])

    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        for i in range(len(q)):
            valid = rows[i] >= 0
            if valid.any():
                out[i, valid] = self._stored(rows[i, valid]) @ q[i]
        return out

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        if self.codes is not None:
            return dequantize_int8(self.codes.take(rows), self.int8)
        return self.floats.take(rows)

    def _search_subset(self, q: np.ndarray, k: int, allowed_ids: np.ndarray):
        row_of = self._rows_of()
        rows = np.array([row_of[i] for i in np.unique(allowed_ids).tolist() if i in row_of], dtype=np.int64)
        if len(rows) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores = q @ self._stored(rows).T
        return self._finish(scores, np.broadcast_to(rows, scores.shape), k)

    def _finish(self, scores: np.ndarray, rows: np.ndarray, k: int):
        n = len(scores)
        out_s = np.full((n, k), -np.inf, dtype=np.float32)
        out_i = np.full((n, k), -1, dtype=np.int64)
        ids = np.where(rows >= 0, self.row_ids[np.maximum(rows, 0)], -1)
        for i in range(n):
            keep = ids[i] >= 0
            s, d = scores[i][keep], ids[i][keep]
            order = np.argsort(-s, kind="stable")[:k]
            out_s[i, : len(order)], out_i[i, : len(order)] = s[order], d[order]
        return out_s, out_i

    # -- persistence ----------------------------------------------------------------------------
    def index_bytes(self) -> int:
        """Size of the serialised FAISS index (codes + graph/lists), excluding the rescoring files."""
        writer = faiss.serialize_index_binary if self.spec.precision == "ubinary" else faiss.serialize_index
        return int(writer(self.index).nbytes)

    def manifest(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.text,
            "precision": self.spec.precision,
            "dim": self.dim,
            "input_dim": self.input_dim,
            "metric": "inner_product",
            "encoder": self.encoder,
            "rescore_with": self.rescore_with,
            "int8": self.int8.to_json() if self.int8 is not None else None,
            "binary": (
                {
                    "method": self.binary_method,
                    "mean": self.binary.mean.tolist(),
                    "rotation": self._files.get("rotation"),
                }
                if self.binary is not None
                else None
            ),
            "adaptor": (
                None
                if self.adaptor_method == "none"
                else {
                    "method": self.adaptor_method,
                    **(
                        {**self.adaptor.to_json(), "matrix": self._files.get("adaptor")}
                        if self.adaptor is not None
                        else {"matrix": None}
                    ),
                }
            ),
            "search": {"ef_search": self.ef_search, "nprobe": self.nprobe},
            "rows": len(self.row_ids),
            "live": self.ntotal,
            "generation": self.generation,
            "files": {
                "index": f"index.{self.generation}.faiss",
                "ids": f"ids.{self.generation}.npy",
                "vectors": self._files.get("vectors"),
                "codes": self._files.get("codes"),
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write a new generation of the index into `directory` (default: where it was loaded from)."""
        folder = Path(directory) if directory is not None else self.directory
        if folder is None:
            raise InvalidInputError("save() needs a directory for an index that was never saved")
        folder.mkdir(parents=True, exist_ok=True)
        old = _read_manifest(folder) if (folder / MANIFEST).exists() else None
        self.generation = max(self.generation, old["generation"] if old else 0) + 1
        gen, same_folder = (
            self.generation,
            self.directory is not None and self.directory.resolve() == folder.resolve(),
        )
        # Files another generation may reference are never overwritten: row stores grow in place only
        # in their own folder (past the old manifest's row count); anything new gets a fresh name.
        for key, store, suffix in (("vectors", self.floats, "f32"), ("codes", self.codes, "i8")):
            if store is None:
                continue
            if not (
                same_folder and store.path is not None and store.path.parent.resolve() == folder.resolve()
            ):
                self._files[key] = f"{key}.{gen}.{suffix}"
            store.save_to(folder / self._files[key])
        if (
            self.binary is not None
            and self.binary.rotation is not None
            and not (same_folder and "rotation" in self._files)
        ):
            self._files["rotation"] = f"binary_rotation.{gen}.npy"
            write_npy(folder / self._files["rotation"], self.binary.rotation)
        if self.adaptor is not None and not (same_folder and "adaptor" in self._files):
            self._files["adaptor"] = f"adaptor.{gen}.npy"
            write_npy(folder / self._files["adaptor"], self.adaptor.matrix)
        manifest = self.manifest()
        writer = faiss.write_index_binary if self.spec.precision == "ubinary" else faiss.write_index
        write_with(folder / manifest["files"]["index"], lambda tmp: writer(self.index, tmp))
        write_npy(folder / manifest["files"]["ids"], self.row_ids)
        write_json(folder / MANIFEST, manifest)  # the commit point
        keep = {*manifest["files"].values(), self._files.get("rotation"), self._files.get("adaptor")}
        for stale in folder.iterdir():
            # older generations, and temporary files of saves that were killed half-way
            if (_GENERATION_FILE.fullmatch(stale.name) and stale.name not in keep) or _TEMP_FILE.fullmatch(
                stale.name
            ):
                stale.unlink(missing_ok=True)
        fsync_dir(folder)
        self.directory = folder
        return folder

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, device: str | None = None, scan: str | None = None
    ) -> VectorIndex:
        """Open a saved index; raises CorruptIndexError when its files cannot be read back. `device`
        and `scan` are as for the constructor (they are not part of the saved index)."""
        folder = Path(directory)
        m = _read_manifest(folder)
        try:
            self = cls(
                m["spec"],
                int(m["dim"]),
                encoder=m.get("encoder", ""),
                rescore_with=m["rescore_with"],
                binary_method=(m.get("binary") or {}).get("method", "itq"),
                adaptor=(m.get("adaptor") or {}).get("method", "none"),
                input_dim=m.get("input_dim"),
            )
            if m.get("adaptor") and m["adaptor"].get("matrix"):
                self._files["adaptor"] = m["adaptor"]["matrix"]
                matrix = np.load(folder / m["adaptor"]["matrix"], allow_pickle=False)
                self.adaptor = MatryoshkaAdaptor.from_json(m["adaptor"], matrix)
                if self.adaptor.dim != self.input_dim:
                    raise CorruptIndexError(
                        f"index at {folder}: adaptor and input_dim disagree: re-run `kvrag index`"
                    )
            self.generation = int(m["generation"])
            self.ef_search = int(m.get("search", {}).get("ef_search", self.ef_search))
            self.nprobe = int(m.get("search", {}).get("nprobe", self.nprobe))
            files = m["files"]
            if m.get("int8"):
                self.int8 = Int8Calibration.from_json(m["int8"])
            if m.get("binary"):
                rotation = None
                if m["binary"].get("rotation"):
                    self._files["rotation"] = m["binary"]["rotation"]
                    rotation = np.load(folder / m["binary"]["rotation"], allow_pickle=False)
                self.binary = BinaryCalibration(np.asarray(m["binary"]["mean"], dtype=np.float32), rotation)
            reader = faiss.read_index_binary if self.spec.precision == "ubinary" else faiss.read_index
            self.index = reader(str(folder / files["index"]))
            self.row_ids = np.load(folder / files["ids"], allow_pickle=False).astype(np.int64)
            rows = int(m["rows"])
            self.floats = RowStore("float32", self.dim, folder / files["vectors"], rows)
            self._files["vectors"] = files["vectors"]
            if files.get("codes"):
                self.codes = RowStore("int8", self.dim, folder / files["codes"], rows)
                self._files["codes"] = files["codes"]
        except CorruptIndexError:
            raise
        except (KeyError, TypeError, ValueError, OSError, RuntimeError, MemoryError) as exc:
            raise CorruptIndexError(
                f"index at {folder} cannot be read ({type(exc).__name__}: {exc}); re-run `kvrag index` to rebuild it"
            ) from exc
        if len(self.row_ids) != rows or self.index.ntotal != self._faiss_rows() or self.index.d != self.dim:
            raise CorruptIndexError(
                f"index at {folder} is inconsistent with its manifest: re-run `kvrag index`"
            )
        # after the checks: a bad device or scan is the caller's error, not a corrupt index
        self.device, self.scan = resolve_scan(self.spec, device, scan)
        self.directory = folder
        return self

    @staticmethod
    def saved_ids(directory: str | os.PathLike) -> np.ndarray:
        """The live ids of the index saved in `directory`, read from its manifest and id map alone
        (no FAISS load): a cheap check against the caller's records. Raises CorruptIndexError when
        they cannot be read."""
        folder = Path(directory)
        m = _read_manifest(folder)
        try:
            ids = np.load(folder / m["files"]["ids"], allow_pickle=False)
        except (KeyError, TypeError, ValueError, OSError, EOFError) as exc:
            raise CorruptIndexError(
                f"index at {folder} cannot be read ({type(exc).__name__}: {exc}); re-run `kvrag index`"
            ) from exc
        if ids.ndim != 1 or len(ids) != m.get("rows"):
            raise CorruptIndexError(
                f"index at {folder} is inconsistent with its manifest: re-run `kvrag index`"
            )
        return ids[ids >= 0].astype(np.int64, copy=False)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptIndexError(
            f"no index at {folder} ({MANIFEST} missing): build one with `kvrag index`"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(
            f"{path} is unreadable ({exc}): re-run `kvrag index` to rebuild the index"
        ) from exc
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise CorruptIndexError(f"{path} has an unknown format: re-run `kvrag index` to rebuild the index")
    return m
