"""Cost of a one-document upsert against the collection's size: p50/p90 latency of upserts through
`kvrag.index.job.index_documents` into collections of each `--sizes` passages, encoding excluded.
Prints one JSON object.

    python benchmarks/upsert_cost.py --sizes 1000 50000 --upserts 30 --json

The smallest size is the baseline: `ratio_p50` is the p50 of each larger size over it (the target
is <= 2: a write costs the same whatever the collection holds). Each collection is filled with
synthetic passages (one passage a document, ~50 Zipf-distributed pseudo-words) by the job itself;
the encoder is a stand-in that returns a deterministic random unit vector per text, and the time it
takes is subtracted from every upsert. Every upsert replaces a random stored document with a new
text: one passage deleted, one added, then `commit` (vector index and BM25 saved). Per upsert the
run also times the two phases inside the job: `commit` (vector save + BM25 update and save) and the
job's own `repair` pass, which compares every stored id with the vector index (O(N)); the figures
`without_repair` leave that pass out.

`--old-upserts` more upserts then run on the same collection with the full rewrites of earlier
versions forced (every save compacts the FAISS index and the id map, BM25 is rebuilt from all
stored passages), to show the cost this layout removes. At the end the saved indexes are checked to
hold exactly the stored passages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import kvrag.index.job as job  # noqa: E402
from kvrag.index.collection import Collection, CollectionConfig  # noqa: E402
from kvrag.index.vector import EVERY_SAVE, Compaction  # noqa: E402

WORDS = 20_000  # pseudo-word vocabulary
WORDS_PER_PASSAGE = 50


class HashEncoder:
    """A stand-in encoder: a deterministic random unit vector per text, its time recorded (and
    subtracted from the upsert it serves); tokens are words."""

    max_tokens = 4096
    fingerprint = "hash"

    def __init__(self, dim: int):
        self.name, self.dim = f"bench/hash-{dim}", dim
        self.seconds = 0.0

    def encode(self, texts: Sequence[str], *, kind="passage", dim=None, show_progress=False) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim, dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        self.seconds += time.perf_counter() - t0
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]


def passage_text(rng: np.random.Generator) -> str:
    ranks = np.minimum(rng.zipf(1.2, WORDS_PER_PASSAGE), WORDS) - 1
    return " ".join(f"w{r:05d}" for r in ranks.tolist())


def documents(start: int, stop: int, rng: np.random.Generator):
    for i in range(start, stop):
        yield job.Document(f"doc{i}", passage_text(rng), title=None, lang="en")


class Timed:
    """Wraps a callable, recording how long each call took."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - t0)


def upserts(coll: Collection, encoder: HashEncoder, size: int, n: int, rng: np.random.Generator) -> dict:
    """Time `n` one-document upserts (each replaces a random document); figures in ms."""
    repair = Timed(job.repair)
    commit = Timed(coll.commit)
    job.repair, coll.commit = repair, commit  # type: ignore[method-assign]
    manifest = coll.folder / "vectors" / "manifest.json"
    totals, compactions = [], 0
    try:
        for _ in range(n):
            doc = job.Document(f"doc{int(rng.integers(size))}", passage_text(rng), lang="en")
            faiss_file = json.loads(manifest.read_text())["files"]["index"]
            encoder.seconds = 0.0
            t0 = time.perf_counter()
            report = job.index_documents(coll, [doc], encoder)
            totals.append(time.perf_counter() - t0 - encoder.seconds)
            assert (report.replaced, report.passages_added) == (1, 1), report
            compactions += json.loads(manifest.read_text())["files"]["index"] != faiss_file
    finally:
        job.repair = repair.fn
        del coll.commit
    ms = np.asarray(totals) * 1000
    rest = ms - np.asarray(repair.calls) * 1000
    return {
        "upserts": n,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "max_ms": round(float(ms.max()), 2),
        "commit_p50_ms": round(float(np.median(commit.calls)) * 1000, 2),
        "repair_p50_ms": round(float(np.median(repair.calls)) * 1000, 2),
        "without_repair_p50_ms": round(float(np.percentile(rest, 50)), 2),
        "faiss_rewrites": compactions,
    }


def consistent(coll: Collection) -> bool:
    """The saved vector index and BM25 hold exactly the stored passages."""
    reopened = Collection.open(coll.folder.parent.parent, coll.name)
    try:
        return job.is_consistent(reopened)
    finally:
        reopened.close()


def run_size(root: Path, size: int, args: argparse.Namespace, encoder: HashEncoder) -> dict:
    rng = np.random.default_rng(size)
    home = root / f"n{size}"
    config = CollectionConfig(encoder=encoder.name, spec=args.spec, max_tokens=512, overlap_tokens=0)
    coll = Collection.create(home, "bench", config)
    try:
        t0 = time.perf_counter()
        job.index_documents(coll, documents(0, size, rng), encoder, batch_docs=4096)
        out: dict = {
            "passages": coll.store.counts()["passages"],
            "build_s": round(time.perf_counter() - t0, 1),
        }
        out.update(upserts(coll, encoder, size, args.upserts, rng))
        bm25 = json.loads((coll.folder / "bm25" / "bm25.json").read_text())
        out["bm25_segments"] = len(bm25.get("segments", []))
        if args.old_upserts:
            coll.index.compaction = EVERY_SAVE
            coll.bm25_incremental = False
            old = upserts(coll, encoder, size, args.old_upserts, rng)
            out["full_rewrite"] = {k: old[k] for k in ("upserts", "p50_ms", "p90_ms", "commit_p50_ms")}
            coll.index.compaction = Compaction()
            coll.bm25_incremental = True
        out["consistent"] = consistent(coll)
    finally:
        coll.close()
        shutil.rmtree(home, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--upserts", type=int, default=30)
    parser.add_argument("--old-upserts", type=int, default=5, help="upserts with full rewrites (0: none)")
    parser.add_argument("--spec", default="Flat")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    encoder = HashEncoder(args.dim)
    root = Path(tempfile.mkdtemp(prefix="upsert-cost-"))
    t0 = time.perf_counter()
    try:
        sizes = {}
        for size in sorted(args.sizes):
            sizes[str(size)] = run_size(root, size, args, encoder)
            if not args.json:
                print(f"{size}: {sizes[str(size)]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = sizes[str(min(args.sizes))]

    def ratios(key: str) -> dict[str, float]:
        return {
            size: round(s[key] / base[key], 2) for size, s in sizes.items() if int(size) != min(args.sizes)
        }

    result = {
        "benchmark": "upsert_cost",
        "spec": args.spec,
        "dim": args.dim,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "baseline_size": min(args.sizes),
        "sizes": sizes,
        "ratio_p50": ratios("p50_ms"),
        "ratio_ok": all(r <= 2 for r in ratios("p50_ms").values()),
        "ratio_commit_p50": ratios("commit_p50_ms"),
        "ratio_without_repair_p50": ratios("without_repair_p50_ms"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
