"""Binary indexes (BFlat, BHNSW<M>, BIVF<nlist>): packed sign bits, dim/8 bytes a vector, compared by
Hamming distance; scores are Hamming similarities 1 - 2 * distance / dim.

Signs are taken after a calibration fitted on the corpus (`encoders.compress.BinaryCalibration`:
mean centring, then by default an ITQ rotation), saved in the manifest (the rotation as a generation
file) and applied to queries alike. A BFlat index can scan on the Hamming top-k kernel instead of
FAISS (`kernel_scan`); BIVF drops removed rows from its inverted lists, the others skip them.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from kvrag.encoders.compress import BinaryCalibration, Int8Calibration, quantize_ubinary
from kvrag.errors import InvalidInputError
from kvrag.index.vectors.base import FamilyStrategy
from kvrag.index.vectors.kernel_scan import KernelScan
from kvrag.index.vectors.spec import BinaryMethod, Family, IndexSpec, Precision, ScanMode


class BinaryStrategy(FamilyStrategy):
    """FAISS binary indexes over calibrated sign bits, searched by FAISS or (BFlat) the kernel."""

    precision = Precision.UBINARY
    families = frozenset({Family.BFLAT, Family.BHNSW, Family.BIVF})
    array_roles = ("rotation",)

    def __init__(self, spec: IndexSpec, dim: int, *, binary_method: BinaryMethod = BinaryMethod.ITQ):
        super().__init__(spec, dim)
        self.method = BinaryMethod.parse(binary_method)
        self.binary: BinaryCalibration | None = None
        self.kernel: KernelScan | None = None
        if spec.family is Family.BIVF:
            self.nprobe = max(1, spec.param // 8)

    # -- the codec ------------------------------------------------------------------------------
    def _new_index(self):
        s, d = self.spec, self.dim
        if s.family is Family.BFLAT:
            return faiss.IndexBinaryFlat(d)
        if s.family is Family.BHNSW:
            return faiss.IndexBinaryHNSW(d, s.param)
        quantizer = faiss.IndexBinaryFlat(d)
        ivf = faiss.IndexBinaryIVF(quantizer, d, s.param)
        ivf.own_fields = True
        quantizer.this.disown()
        return ivf

    @property
    def fitted(self) -> bool:
        return self.binary is not None

    def train(self, x: np.ndarray, queries: np.ndarray | None, int8: Int8Calibration | None) -> None:
        """Centring/rotation on passages and pseudo-queries together; BIVF centroids on the passages."""
        both = x if queries is None else np.concatenate([x, queries])
        self.binary = BinaryCalibration.fit(both, self.method)
        if self.spec.family is Family.BIVF:
            if len(x) < self.spec.param:
                raise InvalidInputError(f"{self.spec.text} needs at least {self.spec.param} vectors to train")
            self.index.train(self.encode(x))

    def encode(self, x: np.ndarray) -> np.ndarray:
        return quantize_ubinary(x, self.binary)

    # -- rows -----------------------------------------------------------------------------------
    @property
    def drops_removed(self) -> bool:
        return self.spec.family is Family.BIVF  # inverted lists store labels: removal renumbers nothing

    def add(self, x: np.ndarray, rows: np.ndarray) -> None:
        encoded = self.encode(x)
        if self.spec.family is Family.BIVF:
            self.index.add_with_ids(encoded, rows)
        else:
            self.index.add(encoded)  # sequential labels == row numbers
        if self.kernel is not None:
            self.kernel.append(encoded, rows)

    def remove(self, rows: np.ndarray) -> None:
        super().remove(rows)
        if self.spec.family is Family.BIVF:
            self.index.remove_ids(rows)
        if self.kernel is not None:
            self.kernel.drop(rows)

    # -- search ---------------------------------------------------------------------------------
    def use_scan(self, device: str, scan: ScanMode) -> None:
        super().use_scan(device, scan)
        self.kernel = KernelScan(device) if scan is ScanMode.KERNEL else None

    def candidates(self, q: np.ndarray, n: int, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = self.encode(q)
        if self.kernel is not None:
            dist, rows = self.kernel.search(self.index, live, codes, n)
        else:
            dist, rows = self.index.search(codes, n, params=self._params(n, live))
        return (1.0 - 2.0 * dist.astype(np.float32) / self.dim), rows

    def _search_params(self, n: int):
        if self.spec.family is Family.BIVF:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
            return params
        return super()._search_params(n)

    # -- persistence ----------------------------------------------------------------------------
    def write_index(self, path: str) -> None:
        faiss.write_index_binary(self.index, path)

    def read_index(self, path: str) -> None:
        self.index = faiss.read_index_binary(path)

    def index_bytes(self) -> int:
        return int(faiss.serialize_index_binary(self.index).nbytes)

    def manifest_entry(self, files: dict[str, str]) -> dict | None:
        if self.binary is None:
            return None
        return {"method": self.method, "mean": self.binary.mean.tolist(), "rotation": files.get("rotation")}

    def arrays(self) -> dict[str, np.ndarray | None]:
        return {"rotation": self.binary.rotation if self.binary is not None else None}

    def restore(self, manifest: dict, read_array: Callable[[str], np.ndarray | None]) -> None:
        entry = manifest.get("binary")
        if entry:
            mean = np.asarray(entry["mean"], dtype=np.float32)
            self.binary = BinaryCalibration(mean, read_array("rotation"))
