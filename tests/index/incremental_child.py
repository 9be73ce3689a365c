"""Crash-test helper: loop (add 8 vectors, remove 3, save) on the Flat index in FOLDER, to be killed.

    python tests/index/incremental_child.py FOLDER

Creates the index (300 vectors) when FOLDER holds none, prints "ready", then after every save that
returned prints "saved ROWS LIVE". Small changes: the saves append to the id log (compacting now and
then), so a kill lands in incremental saves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from kvrag.index.vector import MANIFEST, Compaction, VectorIndex  # noqa: E402

DIM = 32


def say(line: str) -> None:
    """One whole line in one write, so that a kill never leaves half a line."""
    os.write(1, (line + "\n").encode())


def main(argv: list[str]) -> None:
    folder = Path(argv[1])
    if (folder / MANIFEST).exists():
        vi = VectorIndex.load(folder)
    else:
        vi = VectorIndex("Flat", DIM)
        vi.add(np.arange(300), np.random.default_rng(0).standard_normal((300, DIM), dtype=np.float32))
        vi.save(folder)
    vi.compaction = Compaction(fraction=0.05, min_rows=64, max_rows=1000)
    rng = np.random.default_rng(len(vi.row_ids))
    next_id = int(vi.row_ids.max()) + 1
    say("ready")
    while True:
        vi.add(np.arange(next_id, next_id + 8), rng.standard_normal((8, DIM), dtype=np.float32))
        next_id += 8
        live = vi.row_ids[vi.row_ids >= 0]
        vi.remove(rng.choice(live, 3, replace=False))
        vi.save()
        say(f"saved {len(vi.row_ids)} {vi.ntotal}")


if __name__ == "__main__":
    main(sys.argv)
