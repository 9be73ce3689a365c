"""Crash-test helper: grow the index in DIR forever (add 2000 random vectors, save) until killed.

    python tests/index/crash_child.py DIR [SPEC]

Loads the index in DIR, or creates a SPEC index there (Flat by default; Flat or BFlat), then loops:
add BATCH vectors under fresh ids, save(). Prints "ready <ntotal>" once the index is open and
"saved <ntotal>" each time save() has returned, so the parent knows which states were committed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, whatever the cwd

import numpy as np  # noqa: E402

from kvrag.index.vector import MANIFEST, VectorIndex  # noqa: E402

BATCH = 2000
DIM = 32  # only used when creating a new index


def say(line: str) -> None:
    """One whole line in one write: with PYTHONUNBUFFERED a print is several writes, and a kill
    between them would leave half a line for the parent to read."""
    os.write(1, (line + "\n").encode())


def main(argv: list[str]) -> None:
    folder = Path(argv[1])
    spec = argv[2] if len(argv) > 2 else "Flat"
    if spec not in ("Flat", "BFlat"):
        raise SystemExit(f"crash_child: spec must be Flat or BFlat, not {spec!r}")
    vi = VectorIndex.load(folder) if (folder / MANIFEST).exists() else VectorIndex(spec, DIM)
    rng = np.random.default_rng(len(vi.row_ids))
    next_id = int(vi.row_ids.max()) + 1 if len(vi.row_ids) else 0
    say(f"ready {vi.ntotal}")
    while True:
        vi.add(np.arange(next_id, next_id + BATCH), rng.standard_normal((BATCH, vi.dim), dtype=np.float32))
        vi.save(folder)
        next_id += BATCH
        say(f"saved {vi.ntotal}")


if __name__ == "__main__":
    main(sys.argv)
