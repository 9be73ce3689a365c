"""float32 indexes (Flat, HNSW<M>): the unit vectors themselves, by inner product."""

from __future__ import annotations

import faiss
import numpy as np

from kvrag.index.vectors.base import FamilyStrategy
from kvrag.index.vectors.spec import Family, Precision


class FloatStrategy(FamilyStrategy):
    """Flat (exhaustive) and HNSW (graph) indexes over float32 vectors."""

    precision = Precision.FLOAT32
    families = frozenset({Family.FLAT, Family.HNSW})

    def _new_index(self):
        if self.spec.family is Family.FLAT:
            return faiss.IndexFlatIP(self.dim)
        return faiss.IndexHNSWFlat(self.dim, self.spec.param, faiss.METRIC_INNER_PRODUCT)

    def candidates(self, q: np.ndarray, n: int, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(self.encode(q), n, params=self._params(n, live))
        return scores.astype(np.float32), rows
