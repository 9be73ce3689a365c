"""Indexing throughput of the two engines on SciFact abstracts, in one run: the local job, then the Ray
Data job on a local Ray instance with 1 and with 2 actors per pool. Prints one JSON object.

    python benchmarks/index_engines.py --limit 200

Every engine indexes the same first `--limit` abstracts into a fresh collection (bundled encoder, no
embedding cache) and writes the passage KV caches of the bundled generator into a fresh file store.
passages/s is passages over the whole job's wall time: model loading for the local engine, actor
start-up for the Ray one (the Ray instance itself is started once, before the Ray runs, and timed
apart). Stage figures: the local engine's indexing step (chunk, encode, store) and KV step apart, and
for Ray the passages one actor handles per second of its own busy time (summed over the pool's
actors). The runs also check that the engines agree (passages, ids, vectors, KV caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `kernels` package, not kernels.py here

import numpy as np  # noqa: E402

from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.index.collection import Collection, CollectionConfig  # noqa: E402
from kvrag.index.ingest import kv_item  # noqa: E402
from kvrag.index.job import index_paths  # noqa: E402
from kvrag.index.ray_job import KVJobConfig, RayOptions, index_paths_ray, require_ray  # noqa: E402
from kvrag.rag.generation.generator import Generator  # noqa: E402
from kvrag.rag.kvcache.manager import KVCacheManager  # noqa: E402
from kvrag.rag.kvcache.store import open_kv_store  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"
NAME = "scifact"


def rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if seconds > 0 else None


def passages_of(coll: Collection) -> list[tuple]:
    rows = coll.store.passages(coll.store.passage_ids())
    return [(r.id, r.doc_id, r.ord, r.text, r.start, r.end, r.lang, r.kind, r.title) for r in rows]


def vectors_of(coll: Collection) -> dict[int, np.ndarray]:
    floats = coll.index.floats.array()
    return {int(pid): floats[row] for row, pid in enumerate(coll.index.row_ids.tolist()) if pid >= 0}


def kv_files(home: Path) -> set[str]:
    return {p.name for p in (home / "kv").rglob("*.kv")}


def run_local(home: Path, corpus: Path, enc_cfg, kv: KVJobConfig) -> tuple[Collection, dict]:
    t0 = time.perf_counter()
    encoder = load_encoder(enc_cfg)
    t_enc = time.perf_counter()
    coll = Collection.create(home, NAME, CollectionConfig(encoder=enc_cfg.model))
    report = index_paths(coll, [corpus], encoder)
    t_index = time.perf_counter()
    generator = Generator(kv.generator, models_dir=kv.models_dir, device=kv.device, prompt=kv.prompt)
    manager = KVCacheManager(generator, open_kv_store(kv.url), kv.codec, batch_tokens=kv.batch_tokens)
    t_gen = time.perf_counter()
    rows = coll.store.passages(coll.store.passage_ids())
    done = manager.ensure_texts([kv_item(r) for r in rows])
    total = time.perf_counter() - t0
    n = report.passages
    return coll, {
        "passages_per_s": rate(n, total),
        "seconds": round(total, 2),
        "model_load_seconds": round((t_enc - t0) + (t_gen - t_index), 2),
        "index_passages_per_s": rate(n, t_index - t_enc),  # chunk + encode + SQLite + BM25
        "kv_passages_per_s": rate(done["kv_computed"], done["kv_seconds"]),
        "kv_computed": done["kv_computed"],
    }


def run_ray(home: Path, corpus: Path, enc_cfg, kv: KVJobConfig, actors: int, batch_size: int):
    coll = Collection.create(home, NAME, CollectionConfig(encoder=enc_cfg.model))
    stats: dict = {}
    report, kv_report = index_paths_ray(
        coll, [corpus], enc_cfg, kv=kv, options=RayOptions(actors=actors, batch_size=batch_size), stats=stats
    )
    n = report.passages
    return coll, {
        "passages_per_s": rate(n, report.seconds),
        "seconds": round(report.seconds, 2),
        "chunk_pipeline_seconds": stats["chunk_seconds"],
        "embed_kv_pipeline_seconds": stats["embed_kv_seconds"],
        "encoder_actor_passages_per_busy_s": rate(stats["passages_embedded"], stats["encode_busy_seconds"]),
        "kv_actor_passages_per_busy_s": rate(stats["passages_kv"], stats["kv_busy_seconds"]),
        "chunk_actor_documents_per_busy_s": rate(stats["documents_chunked"], stats["chunk_busy_seconds"]),
        "kv_computed": kv_report["kv_computed"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200, help="first N SciFact abstracts (the corpus has 5,183)")
    ap.add_argument("--data", default=str(DATA), help="a BEIR corpus.jsonl")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="passages per Ray batch (small: so that 2 actors share a small run)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the collections and KV stores (printed path)")
    args = ap.parse_args()

    ray = require_ray()
    settings = get_settings()
    enc_cfg = replace(settings.encoder_config(), cache_path=None)
    work = Path(tempfile.mkdtemp(prefix="kvrag-engines-"))
    corpus = work / "corpus.jsonl"
    with open(args.data, encoding="utf-8") as src, corpus.open("w", encoding="utf-8") as dst:
        for n, line in enumerate(src):
            if n >= args.limit:
                break
            dst.write(line)

    def kv_for(home: Path) -> KVJobConfig:
        return KVJobConfig(
            generator=settings.generator,
            models_dir=settings.models_dir,
            url=f"file://{home / 'kv'}",
            codec=settings.kv_codec,
            device=settings.device,
            prompt=settings.prompt,
            batch_tokens=settings.kv_batch_tokens,
        )

    homes = {k: work / k for k in ("local", "ray1", "ray2")}
    local_coll, local = run_local(homes["local"], corpus, enc_cfg, kv_for(homes["local"]))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        ray1_coll, ray1 = run_ray(homes["ray1"], corpus, enc_cfg, kv_for(homes["ray1"]), 1, args.batch_size)
        ray2_coll, ray2 = run_ray(homes["ray2"], corpus, enc_cfg, kv_for(homes["ray2"]), 2, args.batch_size)
    finally:
        ray.shutdown()

    ref_passages, ref_vectors = passages_of(local_coll), vectors_of(local_coll)
    agree = {}
    for key, coll, home in (
        ("ray_1_actor", ray1_coll, homes["ray1"]),
        ("ray_2_actors", ray2_coll, homes["ray2"]),
    ):
        vecs = vectors_of(coll)
        same_ids = sorted(vecs) == sorted(ref_vectors)
        diff = max(float(np.abs(vecs[i] - ref_vectors[i]).max()) for i in vecs) if same_ids and vecs else None
        agree[key] = {
            "same_passages_and_ids": passages_of(coll) == ref_passages,
            "max_abs_vector_diff": diff,
            "same_kv_keys": kv_files(home) == kv_files(homes["local"]),
        }
    for coll in (local_coll, ray1_coll, ray2_coll):
        coll.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # the KV caches take a few MB per passage
    result = {
        "benchmark": "index_engines",
        "corpus": "scifact",
        "documents": args.limit,
        "passages": len(ref_passages),
        "encoder": enc_cfg.model,
        "generator": settings.generator,
        "kv_codec": settings.kv_codec,
        "machine_cpus": os.cpu_count(),
        "ray_cpus": args.ray_cpus,
        "ray_start_seconds": round(ray_start, 2),
        "local": local,
        "ray_1_actor": ray1,
        "ray_2_actors": ray2,
        "ray_2_vs_1_actor_speedup": round(ray2["passages_per_s"] / ray1["passages_per_s"], 3),
        "agreement_with_local": agree,
        **({"work_dir": str(work)} if args.keep else {}),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
