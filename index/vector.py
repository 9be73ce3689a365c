"""FAISS vector indexes described by a spec string, with compressed codes and rescoring.

Specs (faiss factory style; the spec is data: it is saved in the manifest and compared on load):

    Flat, HNSW32              float32 vectors, inner product
    SQ8, HNSW32,SQ8           int8 codes (ranges calibrated on the corpus); float query vs int8 codes
    BFlat, BHNSW32, BIVF256   packed binary codes (dim/8 bytes), Hamming distance

Each precision is a strategy (`vectors.floating`, `vectors.int8`, `vectors.binary`) that builds, trains,
fills and searches its FAISS index; `VectorIndex` wraps one with what makes it a usable index: the id
map, deletions, the adaptor, the stored rows candidates are rescored against, and the public API.

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

Options are `StrEnum`s (`vectors.spec`), validated when the index is made; they equal the strings
saved in manifests. Saving is crash-safe (`vectors.persist`): data files of generation g+1 are
written beside those of g, then the manifest is atomically replaced; a crash at any point leaves
generation g readable.

Saving is incremental: a save that added or deleted a few rows appends them to an id log and writes
no FAISS file, so that a one-passage write costs the same in a collection of any size; the FAISS
index is rewritten whole only by a compaction (`compaction` sets when; `compact()` forces one), and
a load re-adds the logged rows to FAISS from the stored float rows (see `vectors.persist`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kvrag.encoders.adaptor import LearnedFit, MatryoshkaAdaptor
from kvrag.encoders.compress import (
    BinaryCalibration,
    Int8Calibration,
    dequantize_int8,
    normalize,
    quantize_int8,
)
from kvrag.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError
from kvrag.index.vectors import persist
from kvrag.index.vectors.base import FamilyStrategy
from kvrag.index.vectors.binary import BinaryStrategy
from kvrag.index.vectors.floating import FloatStrategy
from kvrag.index.vectors.int8 import Int8Strategy
from kvrag.index.vectors.persist import EVERY_SAVE, FORMAT_VERSION, MANIFEST, Compaction
from kvrag.index.vectors.rows import RowStore
from kvrag.index.vectors.spec import (
    SCANS,
    AdaptorMethod,
    BinaryMethod,
    Family,
    IndexSpec,
    Precision,
    RescoreCodec,
    ScanMode,
    calibrates_on_queries,
    parse_spec,
    resolve_scan,
)

__all__ = [
    "EVERY_SAVE",
    "FORMAT_VERSION",
    "MANIFEST",
    "SCANS",
    "STRATEGIES",
    "AdaptorMethod",
    "BinaryMethod",
    "Compaction",
    "Family",
    "IndexSpec",
    "Precision",
    "RescoreCodec",
    "RowStore",
    "ScanMode",
    "VectorIndex",
    "calibrates_on_queries",
    "parse_spec",
    "resolve_scan",
]

STRATEGIES: dict[Precision, type[FamilyStrategy]] = {
    Precision.FLOAT32: FloatStrategy,
    Precision.INT8: Int8Strategy,
    Precision.UBINARY: BinaryStrategy,
}


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
        if dim <= 0 or (self.spec.precision is Precision.UBINARY and dim % 8):
            raise DimensionMismatchError(
                f"dimension {dim} does not suit {spec}: binary codes need a multiple of 8"
            )
        self.rescore_with = RescoreCodec.parse(rescore_with)
        self.binary_method = BinaryMethod.parse(binary_method)
        self.adaptor_method = AdaptorMethod.parse(adaptor)
        if self.adaptor_method is AdaptorMethod.NONE and input_dim not in (None, dim):
            raise DimensionMismatchError(
                f"input_dim {input_dim} differs from dim {dim}: that needs an adaptor"
            )
        if input_dim is not None and input_dim < dim:
            raise DimensionMismatchError(f"cannot truncate {input_dim}-dim embeddings to {dim} dimensions")
        self.learned = learned or LearnedFit()
        self.adaptor: MatryoshkaAdaptor | None = None
        self.input_dim: int | None = dim if self.adaptor_method is AdaptorMethod.NONE else input_dim
        self.dim, self.encoder = dim, encoder
        self.int8: Int8Calibration | None = None  # ranges of the int8 codes (index or rescoring)
        self._family = STRATEGIES[self.spec.precision](self.spec, dim, binary_method=self.binary_method)
        self.row_ids = np.zeros(0, dtype=np.int64)
        self._row_of: dict[int, int] | None = None
        self.floats = RowStore("float32", dim)
        self.codes: RowStore | None = (
            RowStore("int8", dim) if self.rescore_with is RescoreCodec.INT8 else None
        )
        self._files = persist.IndexFiles()
        self.compaction = Compaction()  # when a save rewrites the FAISS index (not saved)
        # rows deleted since the last save, and their ids: the id log entries of the next save
        self._unsaved_removals: list[tuple[np.ndarray, np.ndarray]] = []
        self._family.use_scan(*resolve_scan(self.spec, device, scan))

    # -- the strategy's state, as attributes ------------------------------------------------------
    @property
    def index(self):
        """The FAISS index (labels are rows)."""
        return self._family.index

    @property
    def binary(self) -> BinaryCalibration | None:
        """The binary codes' calibration (binary specs, once fitted)."""
        return self._family.binary if isinstance(self._family, BinaryStrategy) else None

    @property
    def ef_search(self) -> int:
        return self._family.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._family.ef_search = int(value)

    @property
    def nprobe(self) -> int:
        return self._family.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._family.nprobe = int(value)

    @property
    def device(self) -> str:
        return self._family.device

    @property
    def scan(self) -> ScanMode:
        return self._family.scan

    @property
    def directory(self) -> Path | None:
        """The folder the index was last saved to or loaded from."""
        return self._files.directory

    @property
    def generation(self) -> int:
        return self._files.generation

    # -- calibration ----------------------------------------------------------------------------
    def _needs_int8(self) -> bool:
        return self.spec.precision is Precision.INT8 or self.rescore_with is RescoreCodec.INT8

    @property
    def fitted(self) -> bool:
        return (
            (not self._needs_int8() or self.int8 is not None)
            and self._family.fitted
            and (self.adaptor_method is AdaptorMethod.NONE or self.adaptor is not None)
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
        if self.adaptor_method is not AdaptorMethod.NONE:
            if self.adaptor is None or len(self.row_ids) == 0:
                # the index's own dim is always among the trained truncations; binary codes search
                # on all of their bits, never on a prefix, so they train at the index's dim alone
                opts = self.learned
                if self.spec.precision is Precision.UBINARY:
                    opts = dataclasses.replace(opts, dims=(self.dim,), dim_weights=None)
                elif self.dim not in opts.dims:
                    weights = (*opts.weights(opts.dims, x.shape[1]), float(x.shape[1]) / self.dim)
                    opts = dataclasses.replace(opts, dims=(*opts.dims, self.dim), dim_weights=weights)
                self.adaptor = MatryoshkaAdaptor.fit(x, self.adaptor_method, queries=q, learned=opts)  # type: ignore[arg-type]
                self.input_dim = x.shape[1]
                self._files.forget("adaptor")
            x = self._prepare(x)
        q = self._prepare(q) if q is not None else None
        if self._needs_int8():
            self.int8 = Int8Calibration.fit(x)
        for role in self._family.array_roles:  # the codec's arrays are refitted below
            self._files.forget(role)
        self._files.index_changed()  # rows logged since the last compaction were coded the old way
        self._family.train(x, q, self.int8)

    # -- data -----------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of live (not deleted) vectors."""
        return int((self.row_ids >= 0).sum())

    def has_id(self, id_: int) -> bool:
        """Whether a live vector is stored under `id_`."""
        return int(id_) in self._rows_of()

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as a float32 2-D array of the width `add` and `search` take (`input_dim`)."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        expected = self.input_dim
        if x.ndim != 2 or (x.shape[1] != expected if expected is not None else x.shape[1] < self.dim):
            holds = (
                f"{self.dim}-dim vectors"
                if self.adaptor_method is AdaptorMethod.NONE
                else f"{self.dim}-dim adapted vectors of {expected or 'full'}-dim embeddings ({self.adaptor_method} adaptor)"
            )
            raise DimensionMismatchError(
                f"vectors have shape {x.shape}, this index holds {holds}: use the encoder and "
                f"dim it was built with ({self.encoder or 'see manifest.json'})"
            )
        return x

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Checked input vectors -> the unit-norm `dim` vectors the index stores and compares."""
        if self.adaptor_method is AdaptorMethod.NONE:
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
            self.fit(x if self.adaptor_method is not AdaptorMethod.NONE else normalize(x), fit_queries)
        x = self._prepare(x)
        start = len(self.row_ids)
        rows = np.arange(start, start + len(x), dtype=np.int64)
        if self.index.ntotal != self._faiss_rows():
            raise CorruptIndexError("the FAISS index and its id map disagree: rebuild the index")
        self._family.add(x, rows)
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
        self._unsaved_removals.append((rows, self.row_ids[rows].copy()))
        self.row_ids[rows] = -1
        self._family.remove(rows)
        return len(rows)

    def unsaved_removals(self) -> np.ndarray:
        """The ids deleted since the index was last saved or loaded (callers that keep other indexes
        in step with this one read their deltas here)."""
        if not self._unsaved_removals:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([ids for _, ids in self._unsaved_removals])

    def _faiss_rows(self) -> int:
        """How many entries the FAISS index should hold (binary IVF drops deleted ones)."""
        return self.ntotal if self._family.drops_removed else len(self.row_ids)

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
        if self.adaptor_method is not AdaptorMethod.NONE and self.adaptor is None:  # nothing was ever added
            return _padding(len(q), k)
        q = self._prepare(q)
        if allowed_ids is not None:
            return self._search_subset(q, k, np.asarray(allowed_ids, dtype=np.int64))
        fetch, rerank = self._family.plan(k, rescore, self.ntotal)
        if fetch == 0:
            return _padding(len(q), k)
        scores, rows = self._raw_search(q, fetch)
        if rerank:
            scores = self._rescore(q, rows)
        return self._finish(scores, rows, k)

    def _raw_search(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The strategy's candidate step: (scores, rows) of `n` live rows per prepared query."""
        return self._family.candidates(q, n, self.row_ids >= 0)

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
            return _padding(len(q), k)
        scores = q @ self._stored(rows).T
        return self._finish(scores, np.broadcast_to(rows, scores.shape), k)

    def _finish(self, scores: np.ndarray, rows: np.ndarray, k: int):
        n = len(scores)
        out_s, out_i = _padding(n, k)
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
        return self._family.index_bytes()

    def manifest(self) -> dict:
        return self._files.manifest(self._manifest_body())

    def _manifest_body(self) -> dict:
        names = self._files.names
        adaptor = None
        if self.adaptor_method is not AdaptorMethod.NONE:
            adaptor = {"method": self.adaptor_method, "matrix": None}
            if self.adaptor is not None:
                adaptor = {
                    "method": self.adaptor_method,
                    **self.adaptor.to_json(),
                    "matrix": names.get("adaptor"),
                }
        return {
            "spec": self.spec.text,
            "precision": self.spec.precision,
            "dim": self.dim,
            "input_dim": self.input_dim,
            "metric": "inner_product",
            "encoder": self.encoder,
            "rescore_with": self.rescore_with,
            "int8": self.int8.to_json() if self.int8 is not None else None,
            "binary": self._family.manifest_entry(names),
            "adaptor": adaptor,
            "search": {"ef_search": self.ef_search, "nprobe": self.nprobe},
            "rows": len(self.row_ids),
            "live": self.ntotal,
        }

    def save(self, directory: str | os.PathLike | None = None, *, compact: bool = False) -> Path:
        """Write a new generation of the index into `directory` (default: where it was loaded from):
        an id log append when the rows changed since the last save fit `compaction`, else (or with
        `compact`) the FAISS index and id map whole."""
        folder = Path(directory) if directory is not None else self.directory
        if folder is None:
            raise InvalidInputError("save() needs a directory for an index that was never saved")
        matrix = self.adaptor.matrix if self.adaptor is not None else None
        removed = [rows for rows, _ in self._unsaved_removals]
        self._files.save(
            folder,
            rows={"vectors": self.floats, "codes": self.codes},
            arrays={**self._family.arrays(), "adaptor": matrix},
            write_index=self._family.write_index,
            row_ids=self.row_ids,
            removed_rows=np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64),
            body=self._manifest_body,
            compaction=self.compaction,
            compact=compact,
        )
        self._unsaved_removals = []
        return folder

    def compact(self, directory: str | os.PathLike | None = None) -> Path:
        """Save, writing the FAISS index and the id map whole (an empty id log): the load then
        re-adds nothing."""
        return self.save(directory, compact=True)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, device: str | None = None, scan: str | None = None
    ) -> VectorIndex:
        """Open a saved index; raises CorruptIndexError when its files cannot be read back. `device`
        and `scan` are as for the constructor (they are not part of the saved index)."""
        folder = Path(directory)
        m = persist.read_manifest(folder)
        with persist.reading(folder):
            self = cls(
                m["spec"],
                int(m["dim"]),
                encoder=m.get("encoder", ""),
                rescore_with=m["rescore_with"],
                binary_method=(m.get("binary") or {}).get("method", "itq"),
                adaptor=(m.get("adaptor") or {}).get("method", "none"),
                input_dim=m.get("input_dim"),
            )
            files = self._files = persist.IndexFiles.opened(folder, m)
            matrix = files.read_array("adaptor")
            if matrix is not None:
                self.adaptor = MatryoshkaAdaptor.from_json(m["adaptor"], matrix)
                if self.adaptor.dim != self.input_dim:
                    raise CorruptIndexError(
                        f"index at {folder}: adaptor and input_dim disagree: re-run `kvrag index`"
                    )
            self.ef_search = int(m.get("search", {}).get("ef_search", self.ef_search))
            self.nprobe = int(m.get("search", {}).get("nprobe", self.nprobe))
            if m.get("int8"):
                self.int8 = Int8Calibration.from_json(m["int8"])
            self._family.restore(m, files.read_array)
            self._family.read_index(files.index_path())
            rows = int(m["rows"])
            base = files.read_ids()
            self.row_ids = files.read_row_ids(rows, base)
            self.floats = files.rows("vectors", "float32", self.dim, rows)
            if "codes" in files.names:
                self.codes = files.rows("codes", "int8", self.dim, rows)
            if self.index.d != self.dim or not self._replay_log(base):
                raise persist.inconsistent(folder)
        if len(self.row_ids) != rows or self.index.ntotal != self._faiss_rows():
            raise persist.inconsistent(folder)
        # after the checks: a bad device or scan is the caller's error, not a corrupt index
        self._family.use_scan(*resolve_scan(self.spec, device, scan))
        return self

    def _replay_log(self, base: np.ndarray) -> bool:
        """Bring the FAISS index just read (the rows of the last compaction, `base` their ids) up to
        the id map: rows added since are re-added from the stored float rows, which the strategy
        codes as `add` did (same calibration; an HNSW graph links them anew, so its edges may differ
        from the writer's as they do between two builds); binary IVF also drops the rows deleted
        since. False when the FAISS file does not hold what the manifest says."""
        start = self._files.faiss_rows
        drops = self._family.drops_removed
        if self.index.ntotal != (int((base >= 0).sum()) if drops else start):
            return False
        new = np.arange(start, len(self.row_ids), dtype=np.int64)
        if drops:
            gone = np.flatnonzero((base >= 0) & (self.row_ids[:start] < 0)).astype(np.int64)
            if len(gone):
                self._family.remove(gone)
            new = new[self.row_ids[new] >= 0]
        if len(new):
            self._family.add(np.ascontiguousarray(self.floats.take(new)), new)
        return True

    @staticmethod
    def saved_ids(directory: str | os.PathLike) -> np.ndarray:
        """The live ids of the index saved in `directory`, read from its manifest, id map and id log
        alone (no FAISS load): a cheap check against the caller's records. Raises CorruptIndexError when
        they cannot be read."""
        return persist.saved_ids(Path(directory))


def _padding(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of n queries with no hit: -inf and -1."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
