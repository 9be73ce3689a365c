"""The `kvrag` command line: models, index, query, eval, bench.

Long-running commands show progress bars on a terminal; `--json` prints one machine-readable object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kvrag.encoders.query_writer import DEFAULT_WRITER
from kvrag.errors import KvragError
from kvrag.service.settings import get_settings


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def cmd_models(args: argparse.Namespace) -> int:
    from kvrag.encoders.models import BUNDLED as ENCODERS
    from kvrag.encoders.models import describe_bundled, prepare_all
    from kvrag.rag.compress.bundled import BUNDLED as COMPRESSORS
    from kvrag.rag.generation.bundled import BUNDLED as GENERATORS

    settings = get_settings()
    rows = []
    # each layer lists its own bundled models: encoders, the compressor (built from the e5 encoder)
    # and the generator
    for registry in (ENCODERS, COMPRESSORS, GENERATORS):
        prepared = {p["spec"]: p for p in prepare_all(settings.models_dir, registry)}
        rows += [{**m, **prepared.get(m["spec"], {})} for m in describe_bundled(registry)]
    if args.json:
        _print_json({"models_dir": str(settings.models_dir), "models": rows})
    else:
        for r in rows:
            where = r.get("path") or f"unavailable: {r.get('error')}"
            print(f"{r['spec']:<34} {r['kind']:<8} {where}")
    return 0 if all("path" in r for r in rows) else 1


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
        _print_json({**asdict(report), **extra, **({"kv": kv_report} if kv_report else {})})
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


def cmd_query(args: argparse.Namespace) -> int:
    from kvrag.encoders.encoder import load_encoder
    from kvrag.index.collection import Collection

    settings = get_settings()
    try:
        flt = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError as exc:
        raise KvragError(f"--filter is not valid JSON: {exc.msg}") from exc
    collection = Collection.open(settings.root, args.collection, device=settings.device)
    try:
        if not args.search_only:
            return _answer(settings, collection, args, flt)
        encoder = load_encoder(settings.encoder_config(collection.config.encoder))
        _recover(collection, encoder)
        hits = collection.search(
            args.text, encoder, k=args.k, filter=flt, hybrid=args.hybrid, rescore=args.rescore
        )
    finally:
        collection.close()
    if args.json:
        _print_json({"query": args.text, "collection": args.collection, "hits": [asdict(h) for h in hits]})
        return 0
    print(f"query: {args.text}")
    for rank, h in enumerate(hits, start=1):
        label = h.title or h.doc_id
        section = f" :: {h.section}" if h.section else ""
        snippet = " ".join(h.text.split())[:160]
        print(f"{rank:>2}. [{h.score:.3f}] {label}{section} ({h.lang or '?'}, {h.kind}) {h.source or ''}")
        print(f"      {snippet}")
    return 0


def _recover(collection, encoder) -> None:
    """Repair what an interrupted write left in the collection (see `index.job.recover`); say so."""
    from kvrag.index.job import recover

    report = recover(collection, encoder)
    if report["vectors_added"] or report["vectors_removed"] or report["bm25_rebuilt"]:
        print(
            f"collection {collection.name!r} was left half-written by an interrupted job; repaired: "
            f"{report['vectors_added']} passages indexed, {report['vectors_removed']} stale vectors "
            f"removed{', BM25 rebuilt' if report['bm25_rebuilt'] else ''}",
            file=sys.stderr,
        )


def _answer(settings, collection, args: argparse.Namespace, flt: dict | None) -> int:
    from kvrag.rag.generation.generator import SamplingParams
    from kvrag.rag.pipeline import RagAnswer
    from kvrag.service.runtime import open_generator, open_kv, open_pipeline

    generator = open_generator(settings, args.generator, args.prompt)
    kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    pipeline = open_pipeline(settings, collection, generator=generator, kv=kv)
    _recover(collection, pipeline.encoder)
    if args.ape_temperature is not None:
        pipeline.ape_temperature = args.ape_temperature
    if args.ape_scale is not None:
        pipeline.ape_scale = args.ape_scale
    if args.blend_ratio is not None:
        pipeline.blend_ratio = _ratios(args.blend_ratio)[0]
    sampling = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    stream = args.stream and not args.json
    answer = None
    try:
        if stream:
            print(f"question: {args.text}\nanswer: ", end="", flush=True)
        for item in pipeline.stream(
            args.text, k=args.k, mode=args.mode, filter=flt, hybrid=args.hybrid, sampling=sampling
        ):
            if isinstance(item, RagAnswer):
                answer = item
            elif stream:
                print(item.text, end="", flush=True)
    finally:
        kv.store.close()
    assert answer is not None
    if args.json:
        _print_json({"collection": args.collection, **answer.to_dict()})
        return 0
    if not stream:
        print(f"question: {answer.question}\nanswer: {answer.text}", end="")
    print()
    print("sources:")
    for c in answer.citations:
        label = c.title or c.doc_id
        print(f"  [{c.rank}] {label} (passage {c.passage_id}, document {c.doc_id}) {c.source or ''}")
    t = answer.timings
    print(
        f"mode {answer.mode}: time to first token {t['ttft_ms']:.0f} ms (retrieval {t['retrieval_ms']:.0f},"
        f" KV {t['kv_fetch_ms']:.0f}, prefill {t['prefill_ms']:.0f}); {t['decode_tok_s']:.1f} tokens/s"
    )
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from kvrag.rag.eval.retrieval import RetrievalEvalConfig, run_retrieval_eval

    settings = get_settings()
    # --rotation names the binary-code calibration by what it does: itq, or none (mean-centring only)
    rotation_method = {"itq": "itq", "none": "mean", None: None}[args.rotation]
    if rotation_method and args.binary_method and args.binary_method != rotation_method:
        raise KvragError(
            f"--rotation {args.rotation} means --binary-method {rotation_method}, not {args.binary_method}: "
            "give one of the two"
        )
    cfg = RetrievalEvalConfig(
        data=Path(args.data),
        corpus=Path(args.corpus) if args.corpus else None,
        precision=args.precision,
        spec=args.spec,
        dim=args.dim,
        rescore=args.rescore,
        rescore_with=args.rescore_with,
        binary_method=rotation_method or args.binary_method or "itq",
        adaptor=args.adaptor,
        pseudo_queries=not args.no_pseudo_queries,
        hybrid=args.hybrid,
        bm25_language=args.bm25_language,
        limit=args.limit,
    )
    result = run_retrieval_eval(
        cfg, settings.encoder_config(args.encoder), show_progress=not args.json and sys.stderr.isatty()
    )
    _print_json(result) if args.json else print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_eval_rag(args: argparse.Namespace) -> int:
    from kvrag.encoders.encoder import load_encoder
    from kvrag.rag.eval.rag import RagEvalConfig, Variant, open_eval_collection, run_rag_eval
    from kvrag.service.runtime import open_generator, open_kv, open_pipeline

    settings = get_settings()
    progress = not args.json and sys.stderr.isatty()
    data = Path(args.data)
    if not data.is_file():
        raise KvragError(f"{data}: no such file")
    t = args.ape_temperature if args.ape_temperature is not None else settings.ape_temperature
    sc = args.ape_scale if args.ape_scale is not None else settings.ape_scale
    ratios = _ratios(args.blend_ratio) if args.blend_ratio is not None else [settings.blend_ratio]
    variants = []
    for m in filter(None, (x.strip() for x in args.mode.split(","))):
        variants.extend(Variant.of(m, t, sc, r) for r in (ratios if m == "blend" else ratios[:1]))
    for pair in filter(None, (args.ape_grid or "").split(",")):
        try:
            gt, gs = (float(x) for x in pair.split(":"))
        except ValueError as exc:
            raise KvragError(f"--ape-grid takes T:S pairs separated by commas, not {pair!r}") from exc
        variants.append(Variant.of("ape", gt, gs))
    if args.compress is None and (args.compress_rate is not None or args.compressor_path is not None):
        raise KvragError("--compress-rate and --compressor-path apply with --compress only")
    spec = args.encoder or settings.encoder
    encoder = load_encoder(settings.encoder_config(spec))
    collection = open_eval_collection(settings.root, data, encoder, spec, show_progress=progress)
    generator = open_generator(settings, args.generator, args.prompt)
    kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    try:
        compressor = source = None
        if args.compress is not None:
            compressor, source = _open_compressor(settings, args.compress, generator, args.compressor_path)
        pipeline = open_pipeline(settings, collection, generator=generator, kv=kv)
        cfg = RagEvalConfig(
            data=data,
            k=args.k,
            limit=args.limit,
            offset=args.offset,
            max_new_tokens=args.max_tokens,
            variants=variants,
            compress=args.compress,
            compress_rate=args.compress_rate if args.compress_rate is not None else 0.5,
            compress_source=source,
        )
        result = run_rag_eval(cfg, pipeline, show_progress=progress, compressor=compressor)
    finally:
        kv.store.close()
        collection.close()
    _print_json(result) if args.json else print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def cmd_train_code_adapter(args: argparse.Namespace) -> int:
    from kvrag.encoders.code_adapter import AdapterConfig, train_code_adapter

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = AdapterConfig(
        out=Path(args.out),
        cosqa=Path(args.cosqa) if args.cosqa else None,
        roots=tuple(args.root or ()),
        max_pairs=args.max_pairs,
        docstring_rest=not args.drop_docstring,
        keep_docstring=args.keep_docstring,
        query_style=args.query_style,
        query_writer=args.query_writer,
        batching=args.batching,
        hard_negatives=args.hard_negatives,
        gradient_checkpointing=args.gradient_checkpointing,
        teachers=tuple(args.teacher or ()),
        distill_weight=args.distill_weight,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        alpha=2 * args.rank,
        seed=args.seed,
        name_pairs_weight=args.name_pairs_weight,
        max_steps=args.max_steps,
        extra={"command": "kvrag " + " ".join(sys.argv[1:])},
    )
    return _run_trainer(train_code_adapter, cfg, args)


def cmd_train_compressor(args: argparse.Namespace) -> int:
    from kvrag.rag.compress.train import TrainConfig, train_compressor

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise KvragError(f"{data_dir}: no such folder (give --data-dir, the benchmark data folder)")
    langs = tuple(x.strip() for x in args.langs.split(",") if x.strip())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        data_dir=data_dir,
        out=Path(args.out),
        scifact=args.scifact,
        langs=langs,
        per_lang=args.per_lang,
        max_length=args.max_length,
        train_layers=args.train_layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        extra={"command": "kvrag " + " ".join(sys.argv[1:])},
    )
    return _run_trainer(train_compressor, cfg, args)


def _run_trainer(train, cfg, args: argparse.Namespace) -> int:
    """Run a `kvrag train` job (progress bars on a terminal) and print its report."""
    progress = not args.json and sys.stderr.isatty()
    report = train(cfg, show_progress=progress, log=(lambda *_: None) if args.json else print)
    _print_json(report) if args.json else print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from kvrag.service.app import create_app
    from kvrag.service.limits import is_loopback
    from kvrag.service.server import guarded_h11

    settings = get_settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    if not is_loopback(host) and settings.api_key is None:
        raise KvragError(
            f"refusing to serve on {host} without an API key: set KVRAG_API_KEY (clients send"
            " `Authorization: Bearer <key>`), or bind to 127.0.0.1"
        )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # bm25s sets its own logger to DEBUG on import
    logging.getLogger("bm25s").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = settings.model_copy(
        update={"host": host, "port": port}
    )  # the Host check needs the bind address
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        proxy_headers=False,
        http=guarded_h11(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
    )
    return 0


def cmd_bench_ttft(args: argparse.Namespace) -> int:
    from kvrag.rag.bench_ttft import run_ttft_bench
    from kvrag.service.runtime import open_generator, open_kv

    settings = get_settings()
    generator = open_generator(settings, args.generator, args.prompt)
    kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    try:
        result = run_ttft_bench(
            generator,
            kv,
            k=args.k,
            data=Path(args.data) if args.data else None,
            questions=args.questions,
            repeats=args.repeats,
            blend_ratios=_ratios(args.blend_ratio) if args.blend_ratio else (),
        )
    finally:
        kv.store.close()
    _print_json(result) if args.json else print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_bench_index(args: argparse.Namespace) -> int:
    from kvrag.index.bench import run_index_bench

    result = run_index_bench(
        n=args.n, dim=args.dim, queries=args.queries, k=args.k, rescore=args.rescore, seed=args.seed
    )
    _print_json(result) if args.json else print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def _generation_args(p: argparse.ArgumentParser, default_prompt: str | None = None) -> None:
    p.add_argument("--generator", help="generator model spec (default from KVRAG_GENERATOR)")
    p.add_argument(
        "--kv-url", help="KV store: memory://, file:///path, redis://host:port/db, memory+redis://..."
    )
    p.add_argument(
        "--kv-codec", choices=["fp16", "bf16", "int8", "fp32"], help="default from KVRAG_KV_CODEC (fp16)"
    )
    p.add_argument(
        "--prompt",
        choices=["chat", "extractive"],
        default=default_prompt,
        help="prompt preset (default %(default)s)",
    )


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise KvragError(f"--blend-ratio takes numbers in [0, 1] separated by commas, not {text!r}") from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise KvragError(f"--blend-ratio takes numbers in [0, 1] separated by commas, not {text!r}")
    return values


def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compress",
        choices=["selfinfo", "classifier"],
        help="compress passages before their KV is computed (embeddings, BM25 and citations stay on the"
        " original text); selfinfo uses the generator unless --compressor-path names a causal LM",
    )
    p.add_argument(
        "--compress-rate", type=float, help="kept fraction of passage tokens, in (0, 1] (default 0.5)"
    )
    p.add_argument(
        "--compressor-path",
        help="compressor model: for classifier a token-classification checkpoint folder or bundled spec"
        f" (default {DEFAULT_CLASSIFIER}, distilled by `kvrag train compressor`); for selfinfo a causal LM"
        " folder (default: the generator)",
    )


def _ape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ape-temperature", type=float, help="APE temperature T (default KVRAG_APE_TEMPERATURE)")
    p.add_argument("--ape-scale", type=float, help="APE scaling factor S (default KVRAG_APE_SCALE)")
    p.add_argument(
        "--blend-ratio",
        help="blend mode: fraction of passage tokens recomputed at query time (default KVRAG_BLEND_RATIO);"
        " eval rag takes several separated by commas",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrag", description="Retrieval and KV-cache augmented generation.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="prepare the bundled offline models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    ix = sub.add_parser("index", help="index files, folders and JSONL into a collection")
    ix.add_argument("--collection", required=True)
    ix.add_argument("paths", nargs="+")
    ix.add_argument("--encoder", help="model spec (new collections only; default from KVRAG_ENCODER)")
    ix.add_argument(
        "--spec", default="Flat", help="index spec: Flat, HNSW32, SQ8, BFlat, BHNSW32, BIVF256, ..."
    )
    ix.add_argument("--dim", type=int, help="Matryoshka truncation dimension")
    ix.add_argument(
        "--adaptor",
        choices=("none", "pca", "learned"),
        default="none",
        help="Matryoshka adaptor fitted on the corpus embeddings, applied to passages and queries before"
        " truncation (new collections only)",
    )
    ix.add_argument("--rescore-with", default="float32", choices=["float32", "int8"])
    ix.add_argument("--max-tokens", type=int, default=256, help="passage size in encoder tokens")
    ix.add_argument("--overlap-tokens", type=int, default=32)
    ix.add_argument("--bm25-language", help="Snowball stemmer for BM25 (e.g. english); default: none")
    ix.add_argument("--prune", action="store_true", help="delete documents whose source file is gone")
    ix.add_argument("--no-kv", action="store_true", help="skip the passage KV precompute")
    ix.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: a Ray Data pipeline (needs the `ray` extra) on a local Ray"
        " instance, or on a cluster given by --address or RAY_ADDRESS",
    )
    ix.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local instance)")
    ix.add_argument("--ray-cpus", type=int, help="CPUs of a local Ray instance (default: all)")
    ix.add_argument(
        "--actors", type=int, help="Ray actors per pool: chunking, encoding, passage KV (default 1)"
    )
    _generation_args(ix)
    _compress_args(ix)
    ix.add_argument("--json", action="store_true")
    ix.set_defaults(func=cmd_index)

    q = sub.add_parser("query", help="search a collection")
    q.add_argument("--collection", required=True)
    q.add_argument("text")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--filter", help='metadata filter as JSON, e.g. {"lang": "de"}')
    q.add_argument("--hybrid", action="store_true", help="fuse BM25 with dense results")
    q.add_argument(
        "--rescore", type=int, default=1, help="candidate multiplier for rescoring compressed codes"
    )
    q.add_argument("--search-only", action="store_true", help="print hits without generating an answer")
    q.add_argument("--mode", default="ape", choices=["ape", "parallel", "sequential", "blend"])
    q.add_argument("--stream", action="store_true", help="print the answer token by token")
    q.add_argument("--max-tokens", type=int, default=128, help="most answer tokens")
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--seed", type=int)
    q.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (default %(default)s)")
    _generation_args(q)
    _ape_args(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_query)

    sv = sub.add_parser("serve", help="serve the HTTP API (uvicorn)")
    sv.add_argument("--host", help="bind address (default KVRAG_HOST, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default KVRAG_PORT, 8000)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    r = ev.add_parser("retrieval", help="BEIR-layout retrieval quality")
    r.add_argument("--data", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/")
    r.add_argument("--corpus", help="take corpus.jsonl from another folder (cross-lingual)")
    r.add_argument("--encoder", help="model spec")
    r.add_argument("--precision", default="float32", choices=["float32", "int8", "ubinary"])
    r.add_argument("--spec", help="index spec (default Flat / SQ8 / BFlat by precision)")
    r.add_argument("--dim", type=int)
    r.add_argument("--rescore", type=int, default=1)
    r.add_argument("--rescore-with", default="float32", choices=["float32", "int8"])
    r.add_argument(
        "--binary-method", choices=["itq", "mean", "none"], help="binary-code calibration (default itq)"
    )
    r.add_argument(
        "--rotation", choices=["itq", "none"], help="binary codes: itq, or none = mean-centring only"
    )
    r.add_argument(
        "--adaptor",
        default="none",
        choices=["none", "pca", "learned"],
        help="Matryoshka adaptor fitted on the corpus embeddings before truncation",
    )
    r.add_argument(
        "--no-pseudo-queries",
        action="store_true",
        help="fit the adaptor / binary rotation on passages only, not also on pseudo-queries made from "
        "the corpus (titles or first sentences; never used for corpora of source code)",
    )
    r.add_argument("--hybrid", action="store_true")
    r.add_argument("--bm25-language")
    r.add_argument("--limit", type=int, help="evaluate only the first N queries")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_eval_retrieval)

    rg = ev.add_parser("rag", help="question answering over a SQuAD-format file (EM, F1, TTFT)")
    rg.add_argument(
        "--data", required=True, help="SQuAD-format JSON, e.g. ../shared/data/xquad/xquad.en.json"
    )
    rg.add_argument("--k", type=int, default=5)
    rg.add_argument("--limit", type=int)
    rg.add_argument("--offset", type=int, default=0)
    rg.add_argument(
        "--mode",
        default="ape",
        help="ape, parallel, sequential or blend; several separated by commas share retrieval",
    )
    rg.add_argument("--max-tokens", type=int, default=16, help="most answer tokens")
    rg.add_argument("--encoder", help="retrieval model spec")
    _generation_args(rg, "extractive")
    rg.add_argument(
        "--ape-grid", help="more APE variants on the same retrieval, e.g. 0.9:1.0,0.8:1.0 (T:S pairs)"
    )
    _ape_args(rg)
    _compress_args(rg)
    rg.add_argument("--json", action="store_true")
    rg.set_defaults(func=cmd_eval_rag)

    tr = sub.add_parser("train", help="train models of our own").add_subparsers(dest="what", required=True)
    tc = tr.add_parser(
        "compressor",
        help="distil the selfinfo compressor into a token classifier on the bundled multilingual-e5-small",
    )
    tc.add_argument("--data-dir", default="../shared/data", help="folder with scifact/ and xquad/")
    tc.add_argument("--out", required=True, help="output folder (checkpoint, delta.safetensors, recipe.json)")
    tc.add_argument("--scifact", type=int, default=300, help="SciFact abstracts used (the first N)")
    tc.add_argument(
        "--langs", default="es,ru,zh,ar,hi", help="XQuAD paragraph languages (keep out the evaluated ones)"
    )
    tc.add_argument(
        "--per-lang", type=int, default=60, help="XQuAD paragraphs per language (a seeded sample)"
    )
    tc.add_argument("--max-length", type=int, default=160, help="encoder tokens per passage")
    tc.add_argument("--train-layers", type=int, default=2, help="top encoder layers trained with the head")
    tc.add_argument("--epochs", type=int, default=3)
    tc.add_argument("--batch-size", type=int, default=16)
    tc.add_argument("--lr", type=float, default=2e-4)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(func=cmd_train_compressor)
    ta = tr.add_parser(
        "code-adapter",
        help="train a LoRA code adapter on the bundled multilingual-e5-small from docstring -> code pairs "
        "mined from the installed Python sources",
    )
    ta.add_argument(
        "--out",
        required=True,
        help="output folder (adapter_config.json, adapter_model.safetensors, recipe.json); "
        "encoders/adapters/code-e5-small for bundled:code-e5-small",
    )
    ta.add_argument(
        "--max-pairs", type=int, default=3000, help="training pairs (a seeded sample of those mined)"
    )
    ta.add_argument("--epochs", type=int, default=1)
    ta.add_argument("--batch-size", type=int, default=32, help="pairs per step (in-batch negatives)")
    ta.add_argument("--lr", type=float, default=3e-4)
    ta.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ta.add_argument("--seed", type=int, default=0)
    ta.add_argument(
        "--cosqa",
        default="../shared/data/cosqa/corpus.jsonl",
        help="CoSQA corpus whose functions are kept out of training ('' to keep none out)",
    )
    ta.add_argument(
        "--name-pairs-weight", type=float, default=0.3, help="loss weight of the name -> code pairs (0: none)"
    )
    ta.add_argument(
        "--root",
        action="append",
        help="folder of Python files to mine (repeatable; default: stdlib + site-packages)",
    )
    ta.add_argument(
        "--drop-docstring",
        action="store_true",
        help="remove the whole docstring from the code side (default: remove only its first paragraph, "
        "which becomes the query, and keep the rest)",
    )
    ta.add_argument(
        "--keep-docstring",
        action="store_true",
        help="keep the whole docstring on the code side, as searched code has it "
        "(with --query-style generated, whose queries are not the docstring's words)",
    )
    ta.add_argument(
        "--query-style",
        choices=["docstring", "web", "search", "generated"],
        default="docstring",
        help="web: docstring queries lower-cased without trailing punctuation, as searches are typed; "
        "search: also first sentence, imperative verb, no articles, and 'python' in the query; "
        "generated: searches written from each docstring by --query-writer (cached under KVRAG_HOME)",
    )
    ta.add_argument(
        "--query-writer",
        default=DEFAULT_WRITER,
        help="generator model spec that writes the queries of --query-style generated",
    )
    ta.add_argument(
        "--batching",
        choices=["random", "source"],
        default="random",
        help="source: each batch holds pairs from neighbouring files (harder in-batch negatives)",
    )
    ta.add_argument(
        "--hard-negatives",
        action="store_true",
        help="add to each pair the training code the base model confuses most with the right one "
        "(below 0.95 x its score)",
    )
    ta.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: about a third slower, a fraction of the memory",
    )
    ta.add_argument(
        "--teacher",
        action="append",
        help="encoder spec to distil from (repeatable: their mean score): the adapter also learns to "
        "rank each batch's codes the way the teachers score them",
    )
    ta.add_argument(
        "--distill-weight", type=float, default=1.0, help="weight of the distillation loss (with --teacher)"
    )
    ta.add_argument("--max-steps", type=int, help="stop after this many steps (timing probes)")
    ta.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ta.add_argument("--json", action="store_true")
    ta.set_defaults(func=cmd_train_code_adapter)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bt = bench.add_parser("ttft", help="time to first token: sequential prefill vs APE with stored caches")
    bt.add_argument("--k", type=int, default=10)
    bt.add_argument(
        "--data", help="SQuAD-format JSON for passages and questions (default: XQuAD-en if present)"
    )
    bt.add_argument("--questions", type=int, default=5)
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument("--blend-ratio", help="also time the blend mode at these ratios, e.g. 0.15,0.3")
    _generation_args(bt)
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_bench_ttft)
    b = bench.add_parser("index", help="float flat vs binary flat on synthetic vectors")
    b.add_argument("--n", type=int, default=1_000_000)
    b.add_argument("--dim", type=int, default=384)
    b.add_argument("--queries", type=int, default=200)
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--rescore", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_index)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
