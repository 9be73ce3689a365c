"""int8 indexes (SQ8, HNSW<M>,SQ8): per-dimension 8-bit codes whose ranges are calibrated on the
corpus (`encoders.compress.Int8Calibration`); the float query is compared with the decoded codes."""

from __future__ import annotations

import faiss
import numpy as np

from kvrag.encoders.compress import Int8Calibration
from kvrag.index.vectors.floating import FloatStrategy
from kvrag.index.vectors.spec import Family, Precision


class Int8Strategy(FloatStrategy):
    """FAISS scalar-quantiser indexes, flat or under an HNSW graph, trained with the owner's int8
    ranges (the same ones the int8 rescoring codes use)."""

    precision = Precision.INT8
    families = frozenset({Family.SQ8, Family.HNSW_SQ8})

    def _new_index(self):
        qt, ip = faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        if self.spec.family is Family.SQ8:
            return faiss.IndexScalarQuantizer(self.dim, qt, ip)
        return faiss.IndexHNSWSQ(self.dim, qt, self.spec.param, ip)

    def train(self, x: np.ndarray, queries: np.ndarray | None, int8: Int8Calibration | None) -> None:
        """Set the quantiser's ranges to the calibrated ones instead of letting FAISS fit its own."""
        if int8 is None:
            raise RuntimeError("an int8 index trains on its owner's int8 calibration")
        sq = self.index if self.spec.family is Family.SQ8 else faiss.downcast_index(self.index.storage)
        faiss.copy_array_to_vector(np.concatenate([int8.lo, int8.hi - int8.lo]), sq.sq.trained)
        sq.is_trained = True
        self.index.is_trained = True
