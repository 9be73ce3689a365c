"""The `kvrag` command line: models, index, query, eval, bench.

Long-running commands show progress bars on a terminal; `--json` prints one machine-readable object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kvrag.errors import KvragError
from kvrag.rag.compress import DEFAULT_CLASSIFIER
from kvrag.service.cli_index import (  # noqa: F401 - _default_index_encoder: used by tests
    _default_index_encoder,
    _open_compressor,
    cmd_index,
)
from kvrag.service.cli_index import print_json as _print_json
from kvrag.service.settings import get_settings


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
    from kvrag.rag.generation.sampling import SamplingParams
    from kvrag.rag.pipeline import RagAnswer
    from kvrag.service.runtime import open_generator, open_kv, open_pipeline

    generator = open_generator(settings, args.generator, args.prompt, args.dtype)
    kv = open_kv(settings, generator, url=args.kv_url, codec=args.kv_codec)
    pipeline = open_pipeline(settings, collection, generator=generator, kv=kv)
    _recover(collection, pipeline.encoder)
    if args.ape_temperature is not None:
        pipeline.ape_temperature = args.ape_temperature
    if args.ape_scale is not None:
        pipeline.ape_scale = args.ape_scale
    if args.ape_positions is not None:
        pipeline.ape_positions = args.ape_positions
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
    pos = args.ape_positions or settings.ape_positions
    ratios = _ratios(args.blend_ratio) if args.blend_ratio is not None else [settings.blend_ratio]
    variants = []
    for m in filter(None, (x.strip() for x in args.mode.split(","))):
        variants.extend(Variant.of(m, t, sc, r, pos) for r in (ratios if m == "blend" else ratios[:1]))
    for pair in filter(None, (args.ape_grid or "").split(",")):
        parts = pair.split(":")
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("shared", "distinct")):
                raise ValueError(pair)
            gt, gs = float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise KvragError(
                f"--ape-grid takes T:S or T:S:distinct separated by commas, not {pair!r}"
            ) from exc
        variants.append(Variant.of("ape", gt, gs, positions=parts[2] if len(parts) == 3 else pos))
    if args.compress is None and (args.compress_rate is not None or args.compressor_path is not None):
        raise KvragError("--compress-rate and --compressor-path apply with --compress only")
    spec = args.encoder or settings.encoder
    encoder = load_encoder(settings.encoder_config(spec))
    collection = open_eval_collection(settings.root, data, encoder, spec, show_progress=progress)
    generator = open_generator(settings, args.generator, args.prompt, args.dtype)
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
    generator = open_generator(settings, args.generator, args.prompt, args.dtype)
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
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="generator dtype (default from KVRAG_GENERATOR_DTYPE: auto = float32 on CPU)",
    )
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
        f" (default {DEFAULT_CLASSIFIER}, distilled by `python -m training.compressor`); for selfinfo a causal LM"
        " folder (default: the generator)",
    )


def _ape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ape-temperature", type=float, help="APE temperature T (default KVRAG_APE_TEMPERATURE)")
    p.add_argument("--ape-scale", type=float, help="APE scaling factor S (default KVRAG_APE_SCALE)")
    p.add_argument(
        "--ape-positions",
        choices=["shared", "distinct"],
        help="passages at shared positions (APE) or following each other (default KVRAG_APE_POSITIONS)",
    )
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
        "--kv-policy",
        choices=("eager", "lazy"),
        default="eager",
        help="new collections: compute passage KV caches now (eager) or on first retrieval (lazy,"
        " written back; indexing loads no generator)",
    )
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
