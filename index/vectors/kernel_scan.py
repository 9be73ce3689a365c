"""The exhaustive scan of a BFlat index on the project's Hamming top-k kernel (`kernels.hamming_topk`).

The packed codes of the live rows are kept as a torch tensor on the index's device: copied from the
FAISS index on first use, then kept in step as rows are added and removed. The kernel returns what
`IndexBinaryFlat` with a deleted-row selector returns: ascending Hamming distance, lower row first on
ties, and past the live rows the int32 maximum with row -1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported only when a kernel scan is used
    import torch


class KernelScan:
    """The device copy of a BFlat index's live codes, and the kernel search over it."""

    def __init__(self, device: str):
        self.device = device
        # (codes of the live rows on `device`, their rows or None when every row is live)
        self._codes: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def search(
        self, index, live: np.ndarray, query_codes: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(int32 distances, int64 rows) of the `n` nearest live rows of `index` (an IndexBinaryFlat
        whose labels are rows; `live` marks the rows not deleted) to each packed query code."""
        import torch

        from kvrag.kernels.hamming_topk import PAD_DISTANCE, PAD_INDEX, hamming_topk

        codes, rows_of = self._live_codes(index, live)
        if len(codes) == 0:
            dist = np.full((len(query_codes), n), PAD_DISTANCE, dtype=np.int32)
            rows = np.full((len(query_codes), n), PAD_INDEX, dtype=np.int64)
            return dist, rows
        queries = torch.from_numpy(np.ascontiguousarray(query_codes)).to(codes.device)
        dist_t, pos = hamming_topk(queries, codes, n)
        if rows_of is not None:  # live positions -> rows; increasing, so ties keep their order
            pos = torch.where(pos >= 0, rows_of[pos.clamp(min=0)], pos)
        return dist_t.cpu().numpy(), pos.cpu().numpy()

    def _live_codes(self, index, live: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._codes is None or len(self._codes[0]) != int(live.sum()):
            import torch

            codes = index.reconstruct_n(0, index.ntotal)
            rows_of = None
            if not live.all():
                codes = codes[live]
                rows_of = torch.from_numpy(np.flatnonzero(live).astype(np.int64)).to(self.device)
            self._codes = (torch.from_numpy(np.ascontiguousarray(codes)).to(self.device), rows_of)
        return self._codes

    def append(self, codes: np.ndarray, rows: np.ndarray) -> None:
        """New rows were added (with these packed codes); nothing to do before the first search."""
        if self._codes is None:
            return
        import torch

        held, rows_of = self._codes
        new = torch.from_numpy(np.ascontiguousarray(codes)).to(held.device)
        if rows_of is not None:
            rows_of = torch.cat([rows_of, torch.from_numpy(rows).to(rows_of.device)])
        self._codes = (torch.cat([held, new]), rows_of)

    def drop(self, rows: np.ndarray) -> None:
        """`rows` were deleted; nothing to do before the first search."""
        if self._codes is None:
            return
        import torch

        held, rows_of = self._codes
        if rows_of is None:  # every row was live: positions are rows
            rows_of = torch.arange(len(held), dtype=torch.int64, device=held.device)
        keep = ~torch.isin(rows_of, torch.from_numpy(rows).to(rows_of.device))
        self._codes = (held[keep], rows_of[keep])
