"""APE variants beyond one global T and S, on the same retrieval and questions as `kvrag eval rag`.

    .venv/bin/python benchmarks/ape_variants.py --data ../shared/data/xquad/xquad.en.json \\
        --offset 0 --limit 200 --json

Variants (the sequential baseline and plain APE run beside them on the same questions): passages at
distinct positions (cached keys re-rotated so the passages follow each other,
question at P + sum L) with and without APE's T and S, and per-layer settings that keep the first
layers exact (T = S = 1) and apply T and S above. Prints one JSON object (see `kvrag eval rag`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.rag.eval.rag import RagEvalConfig, Variant, open_eval_collection, run_rag_eval  # noqa: E402
from kvrag.service.runtime import open_generator, open_kv, open_pipeline  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/xquad/xquad.en.json")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--t", type=float, default=0.9)
    ap.add_argument("--s", type=float, default=1.0)
    ap.add_argument("--exact-layers", type=int, default=2, help="first layers kept at T = S = 1")
    ap.add_argument("--variants", default="sequential,ape,distinct,parallel-distinct,per-layer")
    ap.add_argument("--kv-url", default="memory://?max_bytes=4G")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    settings = get_settings()
    encoder = load_encoder(settings.encoder_config())
    collection = open_eval_collection(settings.root, Path(args.data), encoder, settings.encoder)
    generator = open_generator(settings, prompt="extractive")
    kv = open_kv(settings, generator, url=args.kv_url)
    n = generator.num_layers
    e = args.exact_layers
    catalogue = {
        "sequential": Variant("sequential", "sequential"),
        "ape": Variant(f"ape(T={args.t},S={args.s})", "ape", args.t, args.s),
        "distinct": Variant(f"ape(T={args.t},S={args.s},distinct)", "ape", args.t, args.s, "distinct"),
        "parallel-distinct": Variant("parallel(distinct)", "parallel", 1.0, 1.0, "distinct"),
        "per-layer": Variant(
            f"ape(T={args.t},S={args.s},layers>={e})",
            "ape",
            [1.0] * e + [args.t] * (n - e),
            [1.0] * e + [args.s] * (n - e),
        ),
    }
    variants = [catalogue[v] for v in args.variants.split(",")]
    try:
        pipeline = open_pipeline(settings, collection, generator=generator, kv=kv)
        cfg = RagEvalConfig(
            data=Path(args.data), k=args.k, limit=args.limit, offset=args.offset, variants=variants
        )
        result = run_rag_eval(cfg, pipeline)
    finally:
        kv.store.close()
        collection.close()
    if "variants" in result:
        for v in result["variants"].values():
            for key in ("temperature", "scale"):
                if isinstance(v[key], list):
                    v[key] = f"{v[key][0]} x{e}, {v[key][-1]} x{n - e}"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
