"""`kvrag index`: the indexing command (local or Ray engine), with prompt compression and passage KV
precompute; and the helpers other commands share with it (JSON output, opening a compressor)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kvrag.errors import KvragError
from kvrag.service.settings import get_settings


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def cmd_index(args: argparse.Namespace) -> int:
    from kvrag.encoders.encoder import load_encoder
    from kvrag.index.collection import Collection, CollectionConfig
    from kvrag.index.job import index_paths

    settings = get_settings()
    for path in args.paths:
        if not Path(path).expanduser().exists():
            raise KvragError(f"{path}: no such file or folder")
    encoder_spec = args.encoder or _default_index_encoder(settings, args.collection, args.paths)
    config = CollectionConfig(
        encoder=encoder_spec,
        spec=args.spec,
        dim=args.dim,
        adaptor=args.adaptor,
        rescore_with=args.rescore_with,
        max_tokens=args.max_tokens,
        overlap_tokens=args.overlap_tokens,
        bm25_language=args.bm25_language,
    )
    ray_options = None
    if args.engine == "ray":
        from kvrag.index.ray_job import RayOptions, require_ray

        require_ray()
        ray_options = RayOptions(address=args.address, num_cpus=args.ray_cpus, actors=args.actors or 1)
    elif args.address is not None or args.ray_cpus is not None or args.actors is not None:
        raise KvragError("--address, --ray-cpus and --actors apply to --engine ray only")
    if args.compress is None and (args.compress_rate is not None or args.compressor_path is not None):
        raise KvragError("--compress-rate and --compressor-path apply with --compress only")
    if args.compress is not None and ray_options is not None:
        raise KvragError("--compress applies to --engine local only")
    if args.compress_rate is not None:
        from kvrag.rag.compress import check_rate

        check_rate(args.compress_rate)
    compress_report = None
    collection = Collection.open_or_create(settings.root, args.collection, config, device=settings.device)
    try:
        if ray_options is not None:
            report, kv_report = _index_ray(settings, collection, args, ray_options)
        else:
            encoder = load_encoder(settings.encoder_config(collection.config.encoder))
            report = index_paths(
                collection,
                args.paths,
                encoder,
                prune=args.prune,
                show_progress=not args.json and sys.stderr.isatty(),
            )
            kv_report = None
            progress = not args.json and sys.stderr.isatty()
            compression = _index_compression(collection, args)
            generator = None
            if compression is not None or not args.no_kv:
                from kvrag.service.runtime import open_generator

                generator = open_generator(settings, args.generator, args.prompt)
            if compression is not None:
                compress_report = _compress_passages(settings, collection, generator, *compression, progress)
            if not args.no_kv:
                kv_report = _precompute_kv(settings, collection, args, progress=progress, generator=generator)
    finally:
        collection.close()
    if args.json:
        extra = {"engine": args.engine}
        if ray_options is not None:
            extra["actors"] = ray_options.actors
        if compress_report is not None:
            extra["compression"] = compress_report
        print_json({**asdict(report), **extra, **({"kv": kv_report} if kv_report else {})})
    else:
        print(
            f"{report.collection}: {report.added} added, {report.replaced} replaced, {report.unchanged} unchanged,"
            f" {report.pruned} pruned; {report.documents} documents, {report.passages} passages"
            f" ({report.seconds:.1f} s)"
        )
        for s in report.skipped_files[:20]:
            print(f"  skipped {s}")
        if compress_report:
            c = compress_report
            tokens = ""
            if "passage_tokens_mean_original" in c:
                tokens = (
                    f"; passage tokens {c['passage_tokens_mean_original']:.1f} ->"
                    f" {c['passage_tokens_mean_compressed']:.1f} on average"
                )
            print(
                f"compression ({c['method']}, rate {c['rate']}): {c['compressed']} compressed,"
                f" {c['reused']} already compressed{tokens} ({c['seconds']:.1f} s)"
            )
        if kv_report:
            print(
                f"passage KV ({kv_report['codec']}, {kv_report['url']}): {kv_report['kv_computed']} computed,"
                f" {kv_report['kv_present']} already stored, {kv_report['kv_bytes_written'] / 1e6:.1f} MB written"
                f" ({kv_report['kv_seconds']:.1f} s)"
            )
    return 0


def _index_ray(settings, collection, args, options) -> tuple:
    """`--engine ray`: the same job as a Ray Data pipeline (index.ray_job)."""
    from kvrag.index.ray_job import KVJobConfig, index_paths_ray

    kv = None
    if not args.no_kv:
        kv = KVJobConfig(
            generator=args.generator or settings.generator,
            models_dir=settings.models_dir,
            url=args.kv_url or settings.kv_store_url,
            codec=args.kv_codec or settings.kv_codec,
            device=settings.device,
            prompt=args.prompt or settings.prompt,
            batch_tokens=settings.kv_batch_tokens,
        )
    return index_paths_ray(
        collection,
        args.paths,
        settings.encoder_config(collection.config.encoder),
        kv=kv,
        prune=args.prune,
        options=options,
        show_progress=not args.json and sys.stderr.isatty(),
    )


def _default_index_encoder(settings, name: str, paths: list[str]) -> str:
    """The encoder of a new collection when --encoder is not given: the code encoder when every file
    is source code, else the text encoder (an existing collection keeps the one it was built with)."""
    from kvrag.index.collection import Collection
    from kvrag.index.job import count_file_kinds

    try:
        if (Collection.folder_for(settings.root, name) / "passages.sqlite").exists():
            return settings.encoder  # exists: it keeps its own encoder, this value is ignored
    except KvragError:
        return settings.encoder  # a bad name: the normal path reports it
    from kvrag.encoders.models import BUNDLED, BUNDLED_PREFIX

    code = settings.code_encoder
    if code == settings.encoder:
        return settings.encoder
    if code.startswith(BUNDLED_PREFIX) and code[len(BUNDLED_PREFIX) :] not in BUNDLED:
        return settings.encoder  # the code encoder is not available here (its adapter is not trained)
    kinds = count_file_kinds(paths)
    if kinds["code"] and not kinds["text"] and not kinds["jsonl"]:
        print(
            f"{kinds['code']} source files and no text: new collection {name!r} uses the code encoder"
            f" {settings.code_encoder} (--encoder overrides)",
            file=sys.stderr,
        )
        return settings.code_encoder
    return settings.encoder


def _index_compression(collection, args) -> tuple[str, float, str | None] | None:
    """(method, rate, compressor path) for `kvrag index`: the options given, else the settings the
    collection's passages were compressed with before (so new passages get the same treatment)."""
    if args.compress is not None:
        rate = args.compress_rate if args.compress_rate is not None else 0.5
        return args.compress, rate, args.compressor_path
    record = collection.store.compression()
    if record is None:
        return None
    return record["method"], record["rate"], record["source"] if record["method"] == "classifier" else None


DEFAULT_CLASSIFIER = "bundled:compressor-e5-small"


def _open_compressor(settings, method: str, generator, path: str | None):
    """A compressor and what it is made from (recorded with the compressed texts)."""
    from kvrag.rag.compress import METHODS, open_compressor

    if method == "selfinfo":
        if path is not None:
            return open_compressor(method, model=path), str(Path(path).expanduser().resolve())
        return open_compressor(method, generator=generator), generator.spec
    if method == "classifier":
        from kvrag.encoders.models import BUNDLED_PREFIX
        from kvrag.rag.compress.bundled import resolve_compressor

        spec = path if path is not None else DEFAULT_CLASSIFIER
        if spec.startswith(BUNDLED_PREFIX):
            where = resolve_compressor(spec, settings.models_dir)
            return open_compressor(method, path=where, device=settings.device), spec
        where = str(Path(spec).expanduser().resolve())
        return open_compressor(method, path=where, device=settings.device), where
    raise KvragError(f"unknown compression method {method!r}: choose one of {', '.join(METHODS)}")


def _compress_passages(settings, collection, generator, method, rate, path, progress: bool) -> dict:
    """Indexing time: compressed texts for the passages lacking one; the KV is computed from them,
    while embeddings, BM25 and citations stay on the original texts."""
    from kvrag.rag.eval.rag import compress_collection

    compressor, source = _open_compressor(settings, method, generator, path)
    return compress_collection(
        collection.store,
        compressor,
        method,
        rate,
        source=source,
        generator=generator,
        show_progress=progress,
    )


def _precompute_kv(settings, collection, args, *, progress: bool, generator=None) -> dict:
    """Indexing time: every passage's KV cache after the shared prefix, stored once (from the
    passage's compressed text where the collection keeps one)."""
    from kvrag.rag.pipeline import passage_text
    from kvrag.service.runtime import open_generator, open_kv

    generator = generator or open_generator(settings, args.generator, args.prompt)
    kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    try:
        rows = collection.store.passages(collection.store.passage_ids())
        out = kv.ensure(
            [generator.passage_ids(passage_text(r), r.doc_title) for r in rows], progress=progress
        )
        store_errors = kv.store.stats().get("errors", 0)
    finally:
        kv.store.close()
    return {**out, "codec": kv.codec, "url": kv.store.url, "store_errors": store_errors}
