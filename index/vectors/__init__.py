"""The parts of `kvrag.index.vector.VectorIndex`: option enums and specs (`spec`), one strategy per
index family (`floating`, `int8`, `binary`, over `base`; `kernel_scan` for BFlat on a torch device),
append-only row files (`rows`) and the crash-safe on-disk layout (`persist`).

Callers import from `kvrag.index.vector`, which re-exports the public names.
"""
