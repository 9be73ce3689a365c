"""Code adapters scaled, averaged and mixed with their base model, on one BEIR data set.

    .venv/bin/python benchmarks/adapter_mix.py --data ../shared/data/cosqa \
        --adapter encoders/adapters/code-e5-small --scale 0.5 0.75 1.5 [--adapter DIR ...] [--towers] --json

Baselines in the same run: the base model the first adapter names, and every adapter as trained.
Then, for each adapter and each `--scale` s, the adapter with its update x s (its LoRA B matrices x s:
between the base model, s = 0, and the trained adapter, s = 1); with two or more adapters, their mean
update (the low-rank factors concatenated, each B x its own LoRA scaling / n); with `--towers`, the
first adapter's queries against the base model's passages and the other way round (`--out DIR` keeps
the scaled and averaged adapters: `a0-s0.75` is the first adapter x 0.75). Every setting is
exhaustive float32 cosine search (through the embedding cache); prints nDCG@10, recall@10 and MRR@10
per setting as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_fusion import ranked  # noqa: E402

from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.errors import InvalidInputError  # noqa: E402
from kvrag.rag.eval.beir import doc_text, evaluate, load_beir  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _config(adapter: Path) -> dict:
    cfg = json.loads((Path(adapter) / CONFIG).read_text(encoding="utf-8"))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InvalidInputError(f"{adapter}: per-module ranks or alphas are not supported here")
    return cfg


def scale_adapter(src: Path, dst: Path, s: float) -> Path:
    """`src` with its update x `s` (B matrices x s), written to `dst` (config copied byte for byte)."""
    from safetensors.torch import load_file, save_file

    _config(src)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / CONFIG, dst / CONFIG)
    weights = load_file(src / WEIGHTS)
    save_file({k: v * s if "lora_B" in k else v for k, v in weights.items()}, dst / WEIGHTS)
    return dst


def average_adapters(srcs: list[Path], dst: Path) -> Path:
    """One adapter whose update is the mean of `srcs`' updates: A factors stacked, B factors side by
    side, each B x its adapter's LoRA scaling (alpha / r) / n; the result has rank = the sum of ranks
    and alpha = rank (scaling 1)."""
    import torch
    from safetensors.torch import load_file, save_file

    if len(srcs) < 2:
        raise InvalidInputError("averaging needs two or more adapters")
    cfgs = [_config(s) for s in srcs]
    shape = {k: cfgs[0].get(k) for k in ("base_model_name_or_path", "target_modules")}
    if any({k: c.get(k) for k in shape} != shape for c in cfgs):
        raise InvalidInputError("adapters to average must share their base model and target modules")
    weights = [load_file(s / WEIGHTS) for s in srcs]
    if any(w.keys() != weights[0].keys() for w in weights):
        raise InvalidInputError("adapters to average must adapt the same modules")
    factors = [c["lora_alpha"] / c["r"] / len(srcs) for c in cfgs]
    merged = {}
    for k in weights[0]:
        if "lora_A" in k:
            merged[k] = torch.cat([w[k] for w in weights], 0)
        elif "lora_B" in k:
            merged[k] = torch.cat([w[k] * f for w, f in zip(weights, factors, strict=True)], 1).contiguous()
        else:
            merged[k] = weights[0][k]
    rank = sum(c["r"] for c in cfgs)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONFIG).write_text(
        json.dumps({**cfgs[0], "r": rank, "lora_alpha": rank}, indent=2), encoding="utf-8"
    )
    save_file(merged, dst / WEIGHTS)
    return dst


def run(args: argparse.Namespace) -> dict:
    adapters = [Path(a) for a in args.adapter]
    for a in adapters:
        if not (a / CONFIG).is_file() or not (a / WEIGHTS).is_file():
            raise InvalidInputError(f"{a}: not an adapter folder ({CONFIG}, {WEIGHTS})")
    base = _config(adapters[0])["base_model_name_or_path"]
    data = load_beir(Path(args.data))
    doc_ids = list(data.corpus)
    query_ids = sorted(data.queries)[: args.limit] if args.limit else sorted(data.queries)
    qrels = {q: data.qrels[q] for q in query_ids}
    texts = [doc_text(data.corpus[d]) for d in doc_ids]
    queries = [data.queries[q] for q in query_ids]
    embedded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def embed(spec: str) -> tuple[np.ndarray, np.ndarray]:
        if spec not in embedded:
            enc = load_encoder(get_settings().encoder_config(spec))
            embedded[spec] = (enc.encode(queries, kind="query"), enc.encode(texts, kind="passage"))
        return embedded[spec]

    def metrics(q: np.ndarray, d: np.ndarray) -> dict:
        m = evaluate(ranked(q @ d.T, doc_ids, query_ids), qrels, ks=(10,))
        return {k: round(m[k], 4) for k in ("ndcg@10", "recall@10", "mrr@10")}

    out: dict = {"data": args.data, "queries": len(query_ids), "docs": len(doc_ids), "settings": []}

    def add(setting: str, q: np.ndarray, d: np.ndarray) -> None:
        out["settings"].append({"setting": setting, **metrics(q, d)})

    add(f"{base} (baseline)", *embed(base))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or scratch
        for i, a in enumerate(adapters):
            add(f"{a} (as trained)", *embed(str(a)))
            for s in args.scale:
                add(f"{a} x {s}", *embed(str(scale_adapter(a, Path(tmp) / f"a{i}-s{s}", s))))
        if len(adapters) > 1:
            add(
                "mean of " + ", ".join(map(str, adapters)),
                *embed(str(average_adapters(adapters, Path(tmp) / "mean"))),
            )
        if args.towers:
            (bq, bd), (aq, ad) = embed(base), embed(str(adapters[0]))
            add(f"queries {base}, passages {adapters[0]}", bq, ad)
            add(f"queries {adapters[0]}, passages {base}", aq, bd)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--adapter", action="append", required=True, help="adapter folder (repeatable)")
    p.add_argument("--scale", type=float, nargs="*", default=[0.5, 0.75, 1.5], help="update scales")
    p.add_argument("--towers", action="store_true", help="also mix the first adapter's and the base's towers")
    p.add_argument(
        "--out",
        help="keep the scaled and averaged adapters here (each an encoder spec for kvrag eval retrieval; "
        "default: a temporary folder)",
    )
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
