"""What every index family's strategy does, and the parts the families share.

A strategy owns one FAISS index and knows its codec: how the unit vectors an index stores become the
codes FAISS holds (`encode`), how those codes are calibrated (`train`), searched (`candidates`, with the
family's candidate/rescoring rule `plan`) and written to and read from disk. FAISS labels are rows
(0, 1, ... in order of addition); the owner, `kvrag.index.vector.VectorIndex`, maps rows to the
caller's ids, keeps the deletion marks (it hands `candidates` the mask of live rows) and the stored
rows that candidates are rescored against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import faiss
import numpy as np

from kvrag.encoders.compress import Int8Calibration
from kvrag.errors import InvalidInputError
from kvrag.index.vectors.spec import GRAPHS, BinaryMethod, Family, IndexSpec, Precision, ScanMode


class FamilyStrategy:
    """One family of index specs behind `VectorIndex`; subclasses fill in the family's codec."""

    precision: ClassVar[Precision]
    families: ClassVar[frozenset[Family]]
    # names of the generation files (beside the FAISS index) that hold the codec's arrays
    array_roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: IndexSpec, dim: int, *, binary_method: BinaryMethod = BinaryMethod.ITQ):
        if spec.family not in self.families:
            raise InvalidInputError(f"{spec.text} is not a {self.precision} index")
        self.spec, self.dim = spec, dim
        self.index = self._new_index()
        self.ef_search = 64  # HNSW: graph breadth of a search (at least the number of candidates)
        self.nprobe = 1  # IVF: inverted lists visited per query
        self.device, self.scan = "cpu", ScanMode.FAISS
        self._selector: tuple | None = None  # (IDSelectorNot, IDSelectorBatch) over deleted rows

    # -- the codec ------------------------------------------------------------------------------
    def _new_index(self):
        raise NotImplementedError

    @property
    def fitted(self) -> bool:
        """Whether the codec's own calibration is there (the int8 ranges are the owner's to check)."""
        return True

    def train(self, x: np.ndarray, queries: np.ndarray | None, int8: Int8Calibration | None) -> None:
        """Calibrate on corpus vectors `x` (and optional paired pseudo-queries), in the stored space.
        `int8`: the owner's int8 ranges, fitted on `x` when this index or its rescoring uses them."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Unit vectors -> what the FAISS index takes."""
        return x

    # -- rows -----------------------------------------------------------------------------------
    @property
    def drops_removed(self) -> bool:
        """Whether removed rows leave the FAISS index (else they stay and searches skip them)."""
        return False

    def add(self, x: np.ndarray, rows: np.ndarray) -> None:
        """Add unit vectors `x` as `rows` (the next rows in order)."""
        self.index.add(self.encode(x))  # sequential labels == row numbers

    def remove(self, rows: np.ndarray) -> None:
        """`rows` were marked deleted by the owner."""
        self._selector = None

    # -- search ---------------------------------------------------------------------------------
    def plan(self, k: int, rescore: int, live: int) -> tuple[int, bool]:
        """The candidate/rescoring rule: (how many candidates to fetch for the top `k` among `live`
        rows, whether they are re-ranked against the stored rows). `rescore` > 1 fetches `rescore * k`
        candidates and re-ranks them; for float codes that re-ranking is exact, so it only matters for
        the approximate graph, and for compressed codes it restores float scores."""
        return min(k * rescore, live), rescore > 1

    def candidates(self, q: np.ndarray, n: int, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `n` best live rows per unit query (rows -1 past the live ones), best
        first; `live` is the owner's mask of rows not deleted."""
        raise NotImplementedError

    def _search_params(self, n: int):
        if self.spec.family in GRAPHS:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, n)
            return params
        return faiss.SearchParameters()

    def _params(self, n: int, live: np.ndarray):
        """Per-call search parameters: graph/list breadth, and a selector skipping deleted rows."""
        if self._selector is None and not self.drops_removed and not live.all():
            batch = faiss.IDSelectorBatch(np.flatnonzero(~live).astype(np.int64))
            self._selector = (faiss.IDSelectorNot(batch), batch)
        params = self._search_params(n)
        if self._selector is not None:
            params.sel = self._selector[0]
        return params

    def use_scan(self, device: str, scan: ScanMode) -> None:
        """Where and how candidates are found (see `spec.resolve_scan`); only BFlat has a choice."""
        self.device, self.scan = device, scan

    # -- persistence ----------------------------------------------------------------------------
    def write_index(self, path: str) -> None:
        faiss.write_index(self.index, path)

    def read_index(self, path: str) -> None:
        self.index = faiss.read_index(path)

    def index_bytes(self) -> int:
        """Size of the serialised FAISS index (codes + graph/lists)."""
        return int(faiss.serialize_index(self.index).nbytes)

    def manifest_entry(self, files: dict[str, str]) -> dict | None:
        """The manifest's "binary" entry (`files`: the generation files by role), None when unused."""
        return None

    def arrays(self) -> dict[str, np.ndarray | None]:
        """The codec's arrays saved as generation files, by role (see `array_roles`)."""
        return {}

    def restore(self, manifest: dict, read_array: Callable[[str], np.ndarray | None]) -> None:
        """Take the codec's calibration back from a saved manifest and its generation files."""
