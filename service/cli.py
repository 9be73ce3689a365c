"""The `kvrag` command line: models, index, query, eval, bench.

Long-running commands show progress bars on a terminal; `--json` prints one machine-readable object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from encoders.errors import KvragError
from service.settings import get_settings


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def cmd_models(args: argparse.Namespace) -> int:
    from encoders.models import describe_bundled, prepare_all

    settings = get_settings()
    prepared = {p["spec"]: p for p in prepare_all(settings.models_dir)}
    rows = [{**m, **prepared.get(m["spec"], {})} for m in describe_bundled()]
    if args.json:
        _print_json({"models_dir": str(settings.models_dir), "models": rows})
    else:
        for r in rows:
            where = r.get("path") or f"unavailable: {r.get('error')}"
            print(f"{r['spec']:<34} {r['kind']:<8} {where}")
    return 0 if all("path" in r for r in rows) else 1


def cmd_index(args: argparse.Namespace) -> int:
    from encoders.encoder import load_encoder
    from index.collection import Collection, CollectionConfig
    from index.job import index_paths

    settings = get_settings()
    for path in args.paths:
        if not Path(path).expanduser().exists():
            raise KvragError(f"{path}: no such file or folder")
    config = CollectionConfig(
        encoder=args.encoder or settings.encoder,
        spec=args.spec,
        dim=args.dim,
        rescore_with=args.rescore_with,
        max_tokens=args.max_tokens,
        overlap_tokens=args.overlap_tokens,
        bm25_language=args.bm25_language,
    )
    collection = Collection.open_or_create(settings.root, args.collection, config)
    try:
        encoder = load_encoder(settings.encoder_config(collection.config.encoder))
        report = index_paths(
            collection,
            args.paths,
            encoder,
            prune=args.prune,
            show_progress=not args.json and sys.stderr.isatty(),
        )
    finally:
        collection.close()
    if args.json:
        _print_json(asdict(report))
    else:
        print(
            f"{report.collection}: {report.added} added, {report.replaced} replaced, {report.unchanged} unchanged,"
            f" {report.pruned} pruned; {report.documents} documents, {report.passages} passages"
            f" ({report.seconds:.1f} s)"
        )
        for s in report.skipped_files[:20]:
            print(f"  skipped {s}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from encoders.encoder import load_encoder
    from index.collection import Collection

    settings = get_settings()
    collection = Collection.open(settings.root, args.collection)
    try:
        encoder = load_encoder(settings.encoder_config(collection.config.encoder))
        flt = json.loads(args.filter) if args.filter else None
        hits = collection.search(
            args.text, encoder, k=args.k, filter=flt, hybrid=args.hybrid, rescore=args.rescore
        )
    except json.JSONDecodeError as exc:
        raise KvragError(f"--filter is not valid JSON: {exc.msg}") from exc
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


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from rag.eval.retrieval import RetrievalEvalConfig, run_retrieval_eval

    settings = get_settings()
    cfg = RetrievalEvalConfig(
        data=Path(args.data),
        corpus=Path(args.corpus) if args.corpus else None,
        precision=args.precision,
        spec=args.spec,
        dim=args.dim,
        rescore=args.rescore,
        rescore_with=args.rescore_with,
        binary_method=args.binary_method,
        hybrid=args.hybrid,
        bm25_language=args.bm25_language,
        limit=args.limit,
    )
    result = run_retrieval_eval(
        cfg, settings.encoder_config(args.encoder), show_progress=not args.json and sys.stderr.isatty()
    )
    _print_json(result) if args.json else print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_bench_index(args: argparse.Namespace) -> int:
    from index.bench import run_index_bench

    result = run_index_bench(
        n=args.n, dim=args.dim, queries=args.queries, k=args.k, rescore=args.rescore, seed=args.seed
    )
    _print_json(result) if args.json else print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


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
    ix.add_argument("--rescore-with", default="float32", choices=["float32", "int8"])
    ix.add_argument("--max-tokens", type=int, default=256, help="passage size in encoder tokens")
    ix.add_argument("--overlap-tokens", type=int, default=32)
    ix.add_argument("--bm25-language", help="Snowball stemmer for BM25 (e.g. english); default: none")
    ix.add_argument("--prune", action="store_true", help="delete documents whose source file is gone")
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
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_query)

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
    r.add_argument("--binary-method", default="itq", choices=["itq", "mean", "none"])
    r.add_argument("--hybrid", action="store_true")
    r.add_argument("--bm25-language")
    r.add_argument("--limit", type=int, help="evaluate only the first N queries")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_eval_retrieval)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
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
