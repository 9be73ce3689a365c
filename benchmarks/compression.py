"""Prompt compression before KV precompute: answer quality, passage tokens, KV bytes and compressor speed.

    .venv/bin/python benchmarks/compression.py --data ../shared/data/xquad/xquad.en.json \\
        --offset 200 --limit 200 \\
        --settings none@5,selfinfo:0.5@5,classifier:0.5@5,classifier:0.5@10 --json

Every setting answers the same questions with APE (T, S from the settings) over the same retrieval
(embeddings stay on the original paragraphs; only the text whose KV is cached changes). A setting is
`METHOD:RATE@K` (`none@K` is the uncompressed baseline, which always runs). Per setting: EM, F1 and
gold_logprob (as in `kvrag eval rag`), recall@K of the gold paragraph, passage tokens and KV bytes per
question, and their ratios and F1 against the uncompressed run at k = 5. Word scores of a method
are computed once and reused for every rate (the selection is the only thing a rate changes).
Compressor speed is timed on the same paragraphs for every method in the same process: original
generator tokens per second (and words per second) of `compress(texts, rate=0.5)`.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvrag.encoders.encoder import load_encoder  # noqa: E402
from kvrag.rag.compress import open_compressor, split_words  # noqa: E402
from kvrag.rag.eval.rag import compress_collection, open_eval_collection  # noqa: E402
from kvrag.rag.eval.squad import best_score, exact_match, f1_score, load_squad  # noqa: E402
from kvrag.rag.generation.sampling import SamplingParams  # noqa: E402
from kvrag.service.runtime import open_generator, open_kv, open_pipeline  # noqa: E402
from kvrag.service.settings import get_settings  # noqa: E402


def parse_settings(text: str) -> list[tuple[str, float, int]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            head, k = item.split("@")
            if head == "none":
                out.append(("none", 1.0, int(k)))
            else:
                method, rate = head.split(":")
                out.append((method, float(rate), int(k)))
        except ValueError as exc:
            raise SystemExit(f"bad setting {item!r}: use METHOD:RATE@K or none@K") from exc
    if ("none", 1.0, 5) not in out:
        out.insert(0, ("none", 1.0, 5))
    return out


class Memo:
    """A compressor whose word scores are computed once per text (the selection per rate is not)."""

    def __init__(self, compressor):
        self.compressor = compressor
        self.cache: dict[str, object] = {}
        inner = compressor.score_words

        def score_words(texts, words):
            todo = [i for i, t in enumerate(texts) if t not in self.cache]
            if todo:
                fresh = inner([texts[i] for i in todo], [words[i] for i in todo])
                for i, v in zip(todo, fresh, strict=True):
                    self.cache[texts[i]] = v
            return [self.cache[t] for t in texts]

        compressor.score_words = score_words

    def compress(self, texts, *, rate):
        return self.compressor.compress(texts, rate=rate)


def time_compressor(compressor, texts, gen) -> dict:
    tokens = sum(len(gen._encode(t)) for t in texts)
    words = sum(len(split_words(t)) for t in texts)
    compressor.compress(texts[:4], rate=0.5)  # warm-up (first calls allocate)
    t0 = time.perf_counter()
    compressor.compress(texts, rate=0.5)
    s = time.perf_counter() - t0
    return {
        "passages": len(texts),
        "seconds": round(s, 3),
        "tokens_per_s": round(tokens / s, 1),
        "words_per_s": round(words / s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/xquad/xquad.en.json")
    ap.add_argument("--offset", type=int, default=200)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument(
        "--settings",
        default="none@5,selfinfo:0.33@5,selfinfo:0.5@5,selfinfo:0.7@5,"
        "classifier:0.33@5,classifier:0.5@5,classifier:0.7@5,classifier:0.5@10",
    )
    ap.add_argument(
        "--compressor-path",
        default="bundled:compressor-e5-small",
        help="classifier checkpoint folder or bundled spec",
    )
    ap.add_argument(
        "--speed-methods", default="selfinfo,classifier", help="compressors timed on the same paragraphs"
    )
    ap.add_argument("--speed-passages", type=int, default=120, help="paragraphs timed per method")
    ap.add_argument(
        "--keep-digits", action="store_true", help="force-keep every word with a digit (both methods)"
    )
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-url", default="memory://?max_bytes=6G")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings_list = parse_settings(args.settings)
    speed_methods = [m for m in args.speed_methods.split(",") if m]
    methods = sorted({m for m, _, _ in settings_list if m != "none"} | set(speed_methods))
    settings = get_settings()
    data = Path(args.data)
    encoder = load_encoder(settings.encoder_config(settings.encoder))
    collection = open_eval_collection(settings.root, data, encoder, settings.encoder)
    gen = open_generator(settings, None, "extractive")
    kv = open_kv(settings, gen, url=args.kv_url, codec="fp16")
    pipeline = open_pipeline(settings, collection, generator=gen, kv=kv)
    pipeline.ape_temperature, pipeline.ape_scale = settings.ape_temperature, settings.ape_scale
    store = collection.store
    paragraphs, questions = load_squad(data)
    questions = questions[args.offset : args.offset + args.limit]

    compressors, sources = {}, {}
    for m in methods:
        if m == "selfinfo":
            compressors[m] = open_compressor(m, generator=gen, keep_digits=args.keep_digits)
            sources[m] = gen.spec
        elif m == "classifier":
            from kvrag.rag.compress.bundled import resolve_compressor

            path = resolve_compressor(args.compressor_path, settings.models_dir)
            compressors[m] = open_compressor(m, path=path, keep_digits=args.keep_digits)
            sources[m] = args.compressor_path
        else:
            raise SystemExit(f"unknown method {m!r}")
    # Speed: the same paragraphs through every method, before any scores are memoised.
    speed_texts = [p.context for p in paragraphs[: args.speed_passages]]
    speed = {m: time_compressor(compressors[m], speed_texts, gen) for m in speed_methods}
    memo = {m: Memo(c) for m, c in compressors.items()}

    sampling = SamplingParams(max_new_tokens=args.max_tokens, stop=("\n",))
    results = {}
    for method, rate, k in settings_list:
        name = "none" if method == "none" else f"{method}:{rate}"
        name += f"@{k}"
        t_setting = time.perf_counter()
        report = None
        if method == "none":
            pipeline.use_compressed = False
        else:
            report = compress_collection(
                store,
                memo[method],
                method,
                rate,
                source=f"{sources[method]}#{rate}" + ("#digits" if args.keep_digits else ""),
                generator=gen,
            )
            pipeline.use_compressed = True
        hits_per_q = [pipeline.retrieve(q.question, k) for q in questions]
        needed = {h.passage_id: h for hits in hits_per_q for h in hits}
        kv.ensure(pipeline.passage_ids(list(needed.values())))
        m: dict[str, list[float]] = {}
        for q, hits in zip(questions, hits_per_q, strict=True):
            prep = pipeline.prepare(q.question, mode="ape", hits=hits, max_new_tokens=args.max_tokens)
            gold = gen._encode(q.answers[0])
            logps = gen.answer_logprobs(prep.session, gold)
            text, _ = gen.generate(prep.session, sampling)
            m.setdefault("em", []).append(best_score(exact_match, text, q.answers))
            m.setdefault("f1", []).append(best_score(f1_score, text, q.answers))
            m.setdefault("gold_logprob", []).append(sum(logps) / len(logps) if logps else 0.0)
            m.setdefault("recall", []).append(float(any(h.doc_id == q.paragraph_id for h in hits)))
            m.setdefault("passage_tokens", []).append(
                float(sum(len(ids) for ids in pipeline.passage_ids(hits)))
            )
            m.setdefault("kv_bytes", []).append(float(prep.kv.get("bytes", 0)))
        n = len(questions)
        results[name] = {
            "method": method,
            "rate": rate,
            "k": k,
            "em": round(sum(m["em"]) / n, 4),
            "f1": round(sum(m["f1"]) / n, 4),
            "gold_logprob": round(sum(m["gold_logprob"]) / n, 4),
            f"recall@{k}": round(sum(m["recall"]) / n, 4),
            "passage_tokens_per_question": round(statistics.mean(m["passage_tokens"]), 1),
            "kv_bytes_per_question": round(statistics.mean(m["kv_bytes"])),
            "seconds": round(time.perf_counter() - t_setting, 1),
            **({"corpus": report} if report else {}),
        }
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    base = results["none@5"]
    for r in results.values():
        r["passage_tokens_reduction"] = round(
            base["passage_tokens_per_question"] / r["passage_tokens_per_question"], 3
        )
        r["kv_bytes_reduction"] = round(base["kv_bytes_per_question"] / max(r["kv_bytes_per_question"], 1), 3)
        r["f1_vs_uncompressed_k5"] = round(r["f1"] / base["f1"], 4) if base["f1"] else None
    if "selfinfo" in speed and "classifier" in speed:
        speed["classifier_speedup"] = round(
            speed["classifier"]["tokens_per_s"] / speed["selfinfo"]["tokens_per_s"], 2
        )
    out = {
        "data": str(data),
        "questions": n,
        "offset": args.offset,
        "generator": gen.spec,
        "ape": {"temperature": settings.ape_temperature, "scale": settings.ape_scale},
        "kv_codec": "fp16",
        "keep_digits": args.keep_digits,
        "threads": torch.get_num_threads(),
        "compressor_speed": speed,
        "settings": results,
    }
    kv.store.close()
    collection.close()
    print(json.dumps(out, indent=None if args.json else 1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
