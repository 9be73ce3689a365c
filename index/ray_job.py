"""The batch indexing job on Ray Data (`kvrag index --engine ray`): the same result as `index.job`.

Two Ray Data pipelines, with the driver in between holding the only writer of the passage store:

1. **Chunk.** The driver reads files and JSONL with `index.job.iter_documents` and applies the local
   job's checks (duplicate ids, size limit, emptied documents) and its idempotency rule: a document
   whose content hash is unchanged is skipped. The changed documents go through an actor pool
   (`map_batches` over `_Chunker`, which holds the encoder's tokenizer) that cuts them into passages
   with `index.chunking.chunk_document`, exactly as the local job does. Every passage row carries its
   document's position in the run and the document's passage count, so the driver can put the rows
   back in order whatever order Ray returns them in.
2. **Embed and store KV.** The driver writes each document into SQLite in the order the documents were
   read, as the local job does: SQLite assigns the passage ids, so the ids come out the same as with
   the local engine. Then every stored passage flows through a second pipeline: an encoder actor pool
   (`_Embedder`) embeds the passages that the vector index lacks (new ones, and ones a crashed run
   stored but never indexed), and a passage-KV actor pool (`_KVWriter`) opens its own generator and
   KV store from the store URL and writes the caches that are not in the store yet, straight from the
   actor. Only ids and vectors come back to the driver, which adds them to the same `VectorIndex` in
   the same groups as the local job (the first group calibrates quantised indexes), saves the index
   every `checkpoint_every` vectors and at the end, and rebuilds BM25.

Resumable like the local job: documents and their passages are committed to SQLite one document at a
time; passages stored but not in the saved index are embedded on the next run, vectors whose passage
is gone are removed, and KV caches already in the store are not recomputed (keys are content hashes,
so a retried or duplicated write stores the same bytes). A Ray task that fails because its worker or
actor died is retried (`max_restarts` / `max_task_retries` on the actors); an error raised by kvrag
itself (a bad model spec, say) stops the job and is reported as it is.

Ray: an existing instance in this process is used as is; otherwise `ray.init(address)` connects to a
cluster when an address is given (or when Ray finds `RAY_ADDRESS`), and starts a local instance with
`num_cpus` CPUs when there is none. On a cluster, every node needs kvrag installed with the `ray` extra
and the models under the configured models folder, the collection folder lives on the driver, and the
KV store must be one that every node reaches (Redis, Redis Cluster): a `file://` store is written on
each actor's own node. Encoder actors ask for a GPU share when the cluster has GPUs; KV actors run on
the configured device (the KV cache keys depend on the generator's dtype, so they must be computed as
the serving side computes them) and ask for a GPU share when that device is CUDA.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvrag import errors
from kvrag.encoders.encoder import EncoderConfig
from kvrag.errors import InvalidInputError, KvragError
from kvrag.index.collection import Collection
from kvrag.index.ingest import (
    GROUP_PASSAGES,
    Compression,
    Document,
    IngestPlan,
    JobReport,
    embed_text,
    kv_text,
    passage_rows,
)
from kvrag.index.job import compress_passages, iter_documents, prune_sources


class RayNotInstalledError(KvragError):
    """The `ray` extra is missing."""


def require_ray():
    """The `ray` module, or a clear error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library comes with the `data` extra of ray
    except ImportError as exc:
        raise RayNotInstalledError(
            "the ray engine needs Ray Data: install kvrag's optional extra with "
            "`pip install 'kvrag[ray]'` (or `pip install 'ray[data]==2.60.0'`), or use --engine local"
        ) from exc
    return ray


@dataclass(frozen=True)
class KVJobConfig:
    """What each passage-KV actor needs to open its own generator and KV store."""

    generator: str
    models_dir: Path
    url: str
    codec: str = "fp16"
    device: str = "cpu"
    prompt: str = "chat"
    batch_tokens: int = 4096
    compression: Compression | None = None  # the collection's; flagged passages are compressed first


@dataclass(frozen=True)
class RayOptions:
    """How the job runs on Ray.

    `address`: a cluster to connect to (None: `RAY_ADDRESS` if Ray finds it, else a new local
    instance); `num_cpus`: CPUs of a new local instance (None: all); `actors`: actors per pool
    (chunking, encoding, passage KV); `batch_size` passages (`doc_batch_size` documents) per task;
    `cpus_per_actor`: None shares the cluster's CPUs among the pools that run at once;
    `max_restarts`: restarts of a dead actor and retries of its task; `checkpoint_every`: vectors
    between saves of the index.
    """

    address: str | None = None
    num_cpus: int | None = None
    actors: int = 1
    batch_size: int = 64
    doc_batch_size: int = 32
    cpus_per_actor: float | None = None
    max_restarts: int = 3
    checkpoint_every: int = 50_000

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise InvalidInputError("--actors must be at least 1")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise InvalidInputError("--ray-cpus must be at least 1")
        if self.batch_size < 1 or self.doc_batch_size < 1 or self.checkpoint_every < 1:
            raise InvalidInputError("batch sizes and the checkpoint interval must be at least 1")


# -- actors -------------------------------------------------------------------------------------------


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


_CHUNK_COLUMNS = ("i", "n", "ord", "text", "start", "end", "kind", "title", "lang", "content_hash")
_INT_COLUMNS = {"i", "n", "ord", "start", "end"}


def _opt(value: Any) -> str | None:
    """A nullable string column's value (nulls may come back as None or NaN)."""
    return value if isinstance(value, str) else None


def _with_seconds(cols: dict[str, np.ndarray], name: str, seconds: float) -> dict[str, np.ndarray]:
    """Adds a column holding a batch's busy time on its first row (0 elsewhere): the driver sums it."""
    n = len(next(iter(cols.values()))) if cols else 0
    cols[name] = np.zeros(n, dtype=np.float64)
    if n:
        cols[name][0] = seconds
    return cols


class _Chunker:
    """Chunks documents with the encoder's tokenizer (the model runs on CPU here and is never called)."""

    def __init__(self, encoder_config: EncoderConfig, max_tokens: int, overlap_tokens: int, threads: int):
        from kvrag.encoders.encoder import SentenceTransformerEncoder

        _set_threads(threads)
        self.encoder = SentenceTransformerEncoder(replace(encoder_config, device="cpu", cache_path=None))
        self.max_tokens, self.overlap_tokens = max_tokens, overlap_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out: dict[str, list] = {c: [] for c in _CHUNK_COLUMNS}
        for i, text, kind, lang in zip(batch["i"], batch["text"], batch["kind"], batch["lang"], strict=True):
            rows = passage_rows(
                str(text),
                str(kind),
                _opt(lang),
                self.encoder.count_tokens,
                self.max_tokens,
                self.overlap_tokens,
            )
            # a document without passages still sends one marker row (ord -1) so the driver sees it
            for ord_, row in enumerate(rows or [None]):
                out["i"].append(int(i))
                out["n"].append(len(rows))
                out["ord"].append(ord_ if row else -1)
                for c in ("text", "start", "end", "kind", "title", "lang", "content_hash"):
                    out[c].append(row[c] if row else (0 if c in _INT_COLUMNS else None))
        cols = {
            c: np.asarray(v, dtype=np.int64) if c in _INT_COLUMNS else np.asarray(v, dtype=object)
            for c, v in out.items()
        }
        return _with_seconds(cols, "t_chunk", time.perf_counter() - t0)


class _Embedder:
    """Embeds the rows flagged `embed` (others get zero vectors); drops the texts the next stage
    does not need."""

    def __init__(self, encoder_config: EncoderConfig, dim: int | None, threads: int, keep_texts: bool):
        import ray

        from kvrag.encoders.encoder import load_encoder

        _set_threads(threads)
        if ray.get_gpu_ids():
            encoder_config = replace(encoder_config, device="cuda")
        self.encoder = load_encoder(encoder_config)
        self.dim = dim or self.encoder.dim
        self.drop = ("etext",) if keep_texts else ("etext", "text", "dtitle")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        flags = np.asarray(batch["embed"], dtype=bool)
        vectors = np.zeros((len(flags), self.dim), dtype=np.float32)
        if flags.any():
            texts = [str(t) for t in batch["etext"][flags]]
            vectors[flags] = self.encoder.encode(texts, kind="passage", dim=self.dim)
        out = {k: v for k, v in batch.items() if k not in self.drop}
        out["vector"] = vectors
        return _with_seconds(out, "t_embed", time.perf_counter() - t0)


class _KVWriter:
    """The compress and KV steps: compresses the rows flagged `compress` (their compressed texts go
    back to the driver, which stores them), then computes the passage KV caches missing from the
    store from `kv_text` of each row and writes them there; drops the texts."""

    def __init__(self, kv: KVJobConfig, threads: int):
        from kvrag.rag.generation.generator import Generator
        from kvrag.rag.kvcache.manager import KVCacheManager
        from kvrag.rag.kvcache.store import open_kv_store

        _set_threads(threads)
        self.generator = Generator(kv.generator, models_dir=kv.models_dir, device=kv.device, prompt=kv.prompt)
        self.manager = KVCacheManager(
            self.generator, open_kv_store(kv.url), kv.codec, batch_tokens=kv.batch_tokens
        )
        self.compression = kv.compression
        self.compressor = None
        if kv.compression is not None:
            from kvrag.rag.compress import open_from_source

            c = kv.compression
            self.compressor = open_from_source(
                c.method,
                c.source or self.generator.spec,
                models_dir=kv.models_dir,
                device=kv.device,
                generator=self.generator,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        texts = [str(t) for t in batch["text"]]
        compressed = [_opt(c) for c in batch["compressed"]]
        flags = np.asarray(batch["compress"], dtype=bool)
        if flags.any() and self.compressor is not None:
            todo = [t for t, f in zip(texts, flags, strict=True) if f]
            out = iter(self.compressor.compress(todo, rate=self.compression.rate))  # type: ignore[union-attr]
            compressed = [next(out) if f else c for c, f in zip(compressed, flags, strict=True)]
        items = [(kv_text(t, c), _opt(d)) for t, c, d in zip(texts, compressed, batch["dtitle"], strict=True)]
        errors = self.manager.store.stats().get("errors", 0)
        done = self.manager.ensure_texts(items)
        n = len(items)
        out_cols = {k: v for k, v in batch.items() if k not in ("text", "dtitle", "etext", "compressed")}
        out_cols["compressed"] = np.asarray(compressed, dtype=object)
        for col, key in (
            ("kv_present", "kv_present"),
            ("kv_computed", "kv_computed"),
            ("kv_bytes", "kv_bytes_written"),
        ):
            out_cols[col] = np.zeros(n, dtype=np.int64)
            if n:
                out_cols[col][0] = done.get(key, 0)  # per-batch figures ride on the batch's first row
        out_cols["kv_errors"] = np.zeros(n, dtype=np.int64)
        if n:
            out_cols["kv_errors"][0] = self.manager.store.stats().get("errors", 0) - errors
        return _with_seconds(out_cols, "t_kv", time.perf_counter() - t0)


# -- driver -------------------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray for the job: the instance already initialised in this process, else a new connection or
    local instance that is shut down on exit."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning"}
    if address:
        kwargs["address"] = address
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise KvragError(f"cannot start or reach Ray ({type(exc).__name__}: {exc})") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


_ERROR_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _pipeline_error(exc: BaseException) -> KvragError | None:
    """A kvrag error standing for an error raised inside a Ray task or actor: the kvrag error itself
    when one is in the chain, else one carrying the remote error's last `SomeError: message` line
    (Ray hands back an actor's failed start as text only; the full traceback is in Ray's log)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    lines: list[str] = []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KvragError):
            return type(e)(str(e))
        lines += str(e).splitlines()
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m:
            kind = getattr(errors, m.group(1), None)
            if isinstance(kind, type) and issubclass(kind, KvragError):
                return kind(m.group(2))
            return KvragError(f"the Ray pipeline failed: {m.group(1)}: {m.group(2)}")
    return None


@contextmanager
def _data_context(ray: Any, show_progress: bool) -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = show_progress
    try:
        yield
    except KvragError:
        raise
    except Exception as exc:
        error = _pipeline_error(exc)
        if error is not None:
            raise error from exc
        raise
    finally:
        ctx.enable_progress_bars = old


def _resources(ray: Any, options: RayOptions, pools: int, *, gpu: bool) -> dict[str, float]:
    """Per-actor CPU (and GPU) shares so that `pools` pools of `options.actors` actors fit at once."""
    total = ray.cluster_resources()
    cpus = options.cpus_per_actor or max(0.1, min(1.0, total.get("CPU", 1.0) / (pools * options.actors + 1)))
    out = {"num_cpus": round(cpus, 3)}
    gpus = total.get("GPU", 0.0)
    if gpu and gpus > 0:
        out["num_gpus"] = round(min(1.0, gpus / (pools * options.actors)), 3)
    return out


def _map_pool(
    ray: Any, ds: Any, cls: type, kwargs: dict, options: RayOptions, resources: dict, batch_size: int
):
    """`ds.map_batches` through a fixed-size pool of `cls` actors: a dead actor is restarted and its
    batch retried, up to `options.max_restarts` times (Ray Data's own default is to retry forever)."""
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the actor restart and retry limits yet
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            cls,
            fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            batch_size=batch_size,
            batch_format="numpy",
            max_restarts=options.max_restarts,
            max_task_retries=options.max_restarts,
            **resources,
        )


def _threads(resources: dict[str, float]) -> int:
    return max(1, int(resources["num_cpus"]))


def _blocks(n: int, size: int) -> int:
    return max(1, -(-n // size))


def index_paths_ray(
    collection: Collection,
    paths: list[str | Path],
    encoder_config: EncoderConfig,
    *,
    kv: KVJobConfig | None = None,
    prune: bool = False,
    options: RayOptions | None = None,
    show_progress: bool = False,
    stats: dict | None = None,
    compression: Compression | None = None,
) -> tuple[JobReport, dict | None]:
    """`kvrag index --engine ray`: index files, folders and JSONL into the collection (see module
    docstring); returns the job report and, with `kv`, the passage-KV report.

    `compression` changes the collection's compression settings (None keeps the recorded ones);
    the passages lacking a compressed text are compressed in the KV actors (on the driver with no
    `kv`). `stats`, when given, receives timings: Ray start, the wall time of each pipeline, and the
    time the chunking, encoder and KV actors spent working (summed over actors), with passage counts."""
    options = options or RayOptions()
    stats = {} if stats is None else stats
    report = JobReport(collection.name)
    t0 = time.perf_counter()
    for p in paths:
        if not Path(p).expanduser().exists():
            raise InvalidInputError(f"{p}: no such file or folder")
    if encoder_config.model != collection.config.encoder:
        raise InvalidInputError(
            f"collection {collection.name!r} was built with {collection.config.encoder},"
            f" not {encoder_config.model}"
        )
    store_url = None
    if kv is not None:
        from kvrag.rag.kvcache.codec import CODECS

        if kv.codec not in CODECS:
            raise InvalidInputError(f"unknown KV codec {kv.codec!r}: choose one of {', '.join(CODECS)}")
        if kv.url.strip().lower().startswith("memory://"):
            raise InvalidInputError(
                "a memory:// KV store lives inside one process and would vanish with the Ray actors:"
                " give the ray engine a file://, redis:// or redis-cluster:// store"
            )
        from kvrag.rag.kvcache.store import open_kv_store

        probe = open_kv_store(kv.url)  # a bad URL fails here, before any actor starts
        store_url = probe.url
        probe.close()
    from kvrag.encoders.models import resolve_model

    resolve_model(encoder_config.model, encoder_config.models_dir)  # prepares a bundled model once
    if kv is not None:
        from kvrag.rag.generation.bundled import resolve_generator

        resolve_generator(kv.generator, kv.models_dir)

    docs = iter_documents(list(paths), report.skipped_files)
    t_ray = time.perf_counter()
    with collection.writing():  # the driver is the collection's one writer for the whole run
        plan = IngestPlan(collection, compression=compression, report=report)
        if collection.config.kv_policy != "eager":
            kv = None  # computed on first retrieval
        if kv is not None:
            kv = replace(kv, compression=plan.compression)
        with ray_session(options.address, options.num_cpus) as ray, _data_context(ray, show_progress):
            stats["ray_start_seconds"] = round(time.perf_counter() - t_ray, 3)
            stats["cluster_cpus"] = ray.cluster_resources().get("CPU", 0.0)
            groups = _chunk_and_store(ray, plan, docs, encoder_config, options, stats)
            if prune:
                plan.prune(prune_sources(paths))
            kv_totals, repaired = _embed_and_store_kv(ray, plan, groups, encoder_config, kv, options, stats)
        if kv is None and plan.compression is not None:
            _compress_on_driver(plan, encoder_config, show_progress)
        plan.finish(repaired)
    report.seconds = round(time.perf_counter() - t0, 3)
    kv_report = {**kv_totals, "codec": kv.codec, "url": store_url} if kv is not None else None
    return report, kv_report


def _compress_on_driver(plan: IngestPlan, encoder_config: EncoderConfig, show_progress: bool) -> None:
    """The compress step without KV actors to run it (`--no-kv`): here, as the local engine does."""
    ids, texts = plan.compression_todo(everything=True)
    if not ids:
        return
    from kvrag.rag.compress import open_from_source

    c = plan.compression
    assert c is not None and c.source is not None
    compressor = open_from_source(c.method, c.source, models_dir=encoder_config.models_dir)
    plan.report.compression = compress_passages(plan, compressor, ids, texts, show_progress)


def _chunk_and_store(
    ray: Any,
    plan: IngestPlan,
    docs: Iterator[Document],
    encoder_config: EncoderConfig,
    options: RayOptions,
    stats: dict,
) -> list[list[int]]:
    """Triage on the driver, the rows step in the chunking pool, the store step on the driver in the
    order the documents were read; returns the new passage ids in the local job's vector groups."""
    cfg = plan.config
    changed: list[tuple[Document, str]] = []
    for doc in docs:
        digest = plan.triage(doc)
        if digest is not None:
            changed.append((doc, digest))
    groups: list[list[int]] = []
    stats.update(documents_chunked=len(changed), chunk_seconds=0.0, chunk_busy_seconds=0.0)
    if not changed:
        return groups
    t0 = time.perf_counter()

    items = [{"i": i, "text": d.text, "kind": d.kind, "lang": d.lang} for i, (d, _) in enumerate(changed)]
    res = _resources(ray, options, 1, gpu=False)
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items), options.doc_batch_size))
    chunker = {
        "encoder_config": encoder_config,
        "max_tokens": cfg.max_tokens,
        "overlap_tokens": cfg.overlap_tokens,
        "threads": _threads(res),
    }
    ds = _map_pool(ray, ds, _Chunker, chunker, options, res, options.doc_batch_size)
    pending: dict[int, list[dict]] = {}
    counts: dict[int, int] = {}
    next_doc = 0
    current: list[int] = []

    def write(i: int) -> None:
        nonlocal current
        doc, digest = changed[i]
        rows = sorted((r for r in pending.pop(i) if r["ord"] >= 0), key=lambda r: r["ord"])
        rows = [
            {k: r[k] for k in ("text", "start", "end", "kind", "title", "lang", "content_hash")} for r in rows
        ]
        current += plan.store_document(doc, digest, rows)
        if len(current) >= GROUP_PASSAGES:
            groups.append(current)
            current = []

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        stats["chunk_busy_seconds"] += float(batch["t_chunk"].sum())
        for j in range(len(batch["i"])):
            i = int(batch["i"][j])
            row = {
                "ord": int(batch["ord"][j]),
                "text": str(batch["text"][j]) if batch["ord"][j] >= 0 else "",
                "start": int(batch["start"][j]),
                "end": int(batch["end"][j]),
                "kind": _opt(batch["kind"][j]),
                "title": _opt(batch["title"][j]),
                "lang": _opt(batch["lang"][j]),
                "content_hash": _opt(batch["content_hash"][j]),
            }
            pending.setdefault(i, []).append(row)
            counts[i] = max(1, int(batch["n"][j]))
        while next_doc in pending and len(pending[next_doc]) == counts[next_doc]:
            write(next_doc)
            next_doc += 1
    if next_doc != len(changed):
        raise KvragError(f"the chunking pipeline returned {next_doc} of {len(changed)} documents")
    if current:
        groups.append(current)
    stats["chunk_seconds"] = round(time.perf_counter() - t0, 3)
    return groups


def _embed_and_store_kv(
    ray: Any,
    plan: IngestPlan,
    groups: list[list[int]],
    encoder_config: EncoderConfig,
    kv: KVJobConfig | None,
    options: RayOptions,
    stats: dict,
) -> tuple[dict, int]:
    """Pipeline 2: the embed step for the passages the index lacks, the compress and KV steps for
    every passage; returns the KV totals and how many index entries the repair changed."""
    collection, report = plan.collection, plan.report
    totals = {"kv_present": 0, "kv_computed": 0, "kv_bytes_written": 0, "kv_seconds": 0.0, "store_errors": 0}
    stored = plan.store.passage_ids()
    index = collection.index
    indexed = set(index.row_ids[index.row_ids >= 0].tolist()) if index is not None else set()
    stored_set = set(stored)
    orphans = sorted(indexed - stored_set)
    if orphans:
        index.remove(orphans)  # type: ignore[union-attr]
    new = {pid for g in groups for pid in g}
    missing = sorted(stored_set - indexed - new)
    if missing:
        groups = [*groups, missing]
        collection.bm25_dirty = True
    repaired = len(orphans) + len(missing)
    to_embed = [pid for g in groups for pid in g]
    rest = [pid for pid in stored if pid in indexed] if kv is not None else []
    to_compress = set(plan.compression_todo(everything=True)[0]) if kv is not None else set()
    stats.update(
        passages_embedded=len(to_embed),
        passages_kv=len(to_embed) + len(rest) if kv is not None else 0,
        embed_kv_seconds=0.0,
        encode_busy_seconds=0.0,
        kv_busy_seconds=0.0,
    )
    if not to_embed and not rest:
        return totals, repaired

    t0 = time.perf_counter()
    embed_set = set(to_embed)
    items = []
    order = to_embed + rest
    for start in range(0, len(order), 1000):
        for r in collection.store.passages(order[start : start + 1000]):
            flag = r.id in embed_set
            items.append(
                {
                    "id": r.id,
                    "embed": flag,
                    "etext": embed_text(r.doc_title, r.text, r.kind) if flag else "",
                    "text": r.text,
                    "dtitle": r.doc_title,
                    "compressed": r.compressed,
                    "compress": r.id in to_compress,
                }
            )
    pools = int(bool(to_embed)) + int(kv is not None)
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items), options.batch_size))
    if to_embed:
        res = _resources(ray, options, pools, gpu=True)
        dim = index.dim if index is not None else collection.config.dim
        if collection.config.adaptor != "none":
            dim = None  # actors send full embeddings; the index adapts and truncates them
        embedder = {
            "encoder_config": encoder_config,
            "dim": dim,
            "threads": _threads(res),
            "keep_texts": kv is not None,
        }
        ds = _map_pool(ray, ds, _Embedder, embedder, options, res, options.batch_size)
    if kv is not None:
        res = _resources(ray, options, pools, gpu=kv.device.startswith("cuda"))
        ds = _map_pool(
            ray, ds, _KVWriter, {"kv": kv, "threads": _threads(res)}, options, res, options.batch_size
        )

    def encoder():  # only for the group that calibrates a new index
        from kvrag.encoders.encoder import load_encoder

        return load_encoder(encoder_config)

    received: dict[int, np.ndarray] = {}
    compressed: dict[int, str | None] = {}
    next_group = 0
    since_save = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if "t_embed" in batch:
            stats["encode_busy_seconds"] += float(batch["t_embed"].sum())
        if kv is not None:
            stats["kv_busy_seconds"] += float(batch["t_kv"].sum())
            totals["kv_present"] += int(batch["kv_present"].sum())
            totals["kv_computed"] += int(batch["kv_computed"].sum())
            totals["kv_bytes_written"] += int(batch["kv_bytes"].sum())
            totals["store_errors"] += int(batch["kv_errors"].sum())
            flags = np.asarray(batch["compress"], dtype=bool)
            compressed.update(
                (int(pid), _opt(c))
                for pid, c in zip(batch["id"][flags], batch["compressed"][flags], strict=True)
            )
        if "vector" not in batch:
            continue
        flags = np.asarray(batch["embed"], dtype=bool)
        for pid, vec in zip(batch["id"][flags].tolist(), batch["vector"][flags], strict=True):
            received[int(pid)] = np.asarray(vec, dtype=np.float32)
        while next_group < len(groups) and all(pid in received for pid in groups[next_group]):
            ids = groups[next_group]
            plan.add_vectors(ids, np.stack([received.pop(pid) for pid in ids]), encoder)
            next_group += 1
            since_save += len(ids)
            if since_save >= options.checkpoint_every:
                collection.index.save(collection.folder / "vectors")  # type: ignore[union-attr]
                since_save = 0
    if next_group != len(groups):
        raise KvragError(f"the embedding pipeline returned vectors for {next_group} of {len(groups)} groups")
    report.passages_added = len(new)  # the repair's passages count as repaired, not added
    if compressed:
        plan.store.set_compressed(compressed)
        plan.report.compression = {
            "method": plan.compression.method,  # type: ignore[union-attr]
            "rate": plan.compression.rate,  # type: ignore[union-attr]
            "compressed": len(compressed),
            "reused": len(stored) - len(compressed),
        }
    totals["kv_seconds"] = round(time.perf_counter() - t0, 3) if kv is not None else 0.0
    stats["embed_kv_seconds"] = round(time.perf_counter() - t0, 3)
    return totals, repaired
