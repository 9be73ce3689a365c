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
    from kvrag.index.collection import Collection, CollectionConfig

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
        kv_policy=args.kv_policy,
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
    if args.compress_rate is not None:
        from kvrag.rag.compress import check_rate

        check_rate(args.compress_rate)
    collection = Collection.open_or_create(settings.root, args.collection, config, device=settings.device)
    try:
        if ray_options is not None:
            report, kv_report = _index_ray(settings, collection, args, ray_options)
        else:
            report, kv_report = _index_local(settings, collection, args)
    finally:
        collection.close()
    policy = collection.config.kv_policy
    compress_report = report.compression
    if args.json:
        extra = {"engine": args.engine, "kv_policy": policy}
        if ray_options is not None:
            extra["actors"] = ray_options.actors
        if compress_report is not None:
            extra["compression"] = compress_report
        out = {k: v for k, v in asdict(report).items() if k not in ("kv", "compression")}
        print_json({**out, **extra, **({"kv": kv_report} if kv_report else {})})
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
            took = f" ({c['seconds']:.1f} s)" if "seconds" in c else ""
            print(
                f"compression ({c['method']}, rate {c['rate']}): {c['compressed']} compressed,"
                f" {c['reused']} already compressed{tokens}{took}"
            )
        if kv_report:
            print(
                f"passage KV ({kv_report['codec']}, {kv_report['url']}): {kv_report['kv_computed']} computed,"
                f" {kv_report['kv_present']} already stored, {kv_report['kv_bytes_written'] / 1e6:.1f} MB written"
                f" ({kv_report['kv_seconds']:.1f} s)"
            )
        elif policy == "lazy" and not args.no_kv:
            print("passage KV: lazy (each cache is computed on its first retrieval and stored)")
    return 0


def _index_local(settings, collection, args) -> tuple:
    """`--engine local`: every step of the ingest plan in this process (index.job)."""
    from kvrag.encoders.encoder import load_encoder
    from kvrag.index.job import index_paths

    progress = not args.json and sys.stderr.isatty()
    encoder = load_encoder(settings.encoder_config(collection.config.encoder))
    compression = _compression_option(settings, args)
    recorded = compression or collection.store.compression()
    generator = compressor = kv = None
    eager = collection.config.kv_policy == "eager" and not args.no_kv
    if recorded is not None or eager:
        from kvrag.service.runtime import open_generator

        generator = open_generator(settings, args.generator, args.prompt, args.dtype)
    if recorded is not None:
        from kvrag.index.ingest import Compression
        from kvrag.rag.compress import open_from_source

        c = recorded if isinstance(recorded, Compression) else Compression(**recorded)
        compressor = open_from_source(
            c.method,
            c.source or generator.spec,
            models_dir=settings.models_dir,
            device=settings.device,
            generator=generator,
        )
    if eager:
        from kvrag.service.runtime import open_kv

        kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    try:
        report = index_paths(
            collection,
            args.paths,
            encoder,
            prune=args.prune,
            show_progress=progress,
            compression=compression,
            compressor=compressor,
            kv=kv,
        )
    finally:
        if kv is not None:
            kv.store.close()
    if report.compression is not None and generator is not None:
        from kvrag.rag.eval.rag import token_figures

        report.compression.update(token_figures(collection.store, generator))
    kv_report = None
    if kv is not None:
        kv_report = {
            **(report.kv or {}),
            "codec": kv.codec,
            "url": kv.store.url,
            "store_errors": kv.store.stats().get("errors", 0),
        }
    return report, kv_report


def _compression_option(settings, args):
    """The compression `--compress` asks for (None: keep what the collection recorded)."""
    if args.compress is None:
        return None
    from kvrag.index.ingest import Compression
    from kvrag.rag.compress import compression_source

    rate = args.compress_rate if args.compress_rate is not None else 0.5
    source = compression_source(args.compress, args.compressor_path, args.generator or settings.generator)
    return Compression(args.compress, float(rate), source)


def _index_ray(settings, collection, args, options) -> tuple:
    """`--engine ray`: the same plan with its steps in Ray actor pools (index.ray_job)."""
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
        compression=_compression_option(settings, args),
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


def _open_compressor(settings, method: str, generator, path: str | None):
    """A compressor for the user's options, and the source recorded with its texts."""
    from kvrag.rag.compress import compression_source, open_from_source

    source = compression_source(method, path, generator.spec)
    compressor = open_from_source(
        method, source, models_dir=settings.models_dir, device=settings.device, generator=generator
    )
    return compressor, source
