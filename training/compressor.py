"""Distilling the `selfinfo` compressor into a token classifier (`bundled:compressor-e5-small`).

    python -m training.compressor --out DIR --scifact 300 --langs es,ru,zh,ar,hi --per-lang 60 [--json]

The teacher (a causal LM's self-information, `SelfInfoCompressor`) scores every word of a passage;
its keep/drop decisions at rates 0.1, 0.2, ..., 0.9 are averaged into one soft label per word (a word
kept down to rate 0.2 gets 0.8 or more, a word dropped already at rate 0.9 gets 0). The student is the
bundled multilingual-e5-small encoder with a 2-label token head: every sub-token of a word learns the
word's label (cross-entropy against the soft label), and at compression time the word's probability
is the mean over its sub-tokens, as in `ClassifierCompressor`.

Only the top `train_layers` encoder layers and the head are trained. The frozen layers below them are
run once over the whole corpus and their output is cached, so each epoch costs only the trained
layers. Everything is seeded (data split, head initialisation, batch order); on a CPU the run is
reproducible bit for bit with the same torch build and thread count.

Data: SciFact abstracts and XQuAD paragraphs in languages other than the one evaluated on (passages
are cut at `max_length` encoder tokens). A held-out share of passages measures how well the student
agrees with the teacher (overlap of the kept words at rate 0.5, and how many of the teacher's words
the student keeps).

The result is written twice: a full token-classification checkpoint folder (loadable by
`ClassifierCompressor` or any HF code), and a small delta file holding only the trained tensors
(`delta.safetensors`, fp16) with `recipe.json`; `bundled:compressor-e5-small` rebuilds the checkpoint
from the bundled encoder and that delta (the package keeps only `delta.safetensors` and `recipe.json`,
in `rag/compress/models/compressor-e5-small/`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.compress.base import char_to_word, mean_per_word, select_words, split_words, token_words
from training.common import add_common_args, cached_rows, command_line, run_job, warmup_cosine

TEACHER_RATES = tuple(round(0.1 * i, 1) for i in range(1, 10))
XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")


@dataclass
class TrainConfig:
    data_dir: Path
    out: Path
    encoder: str = "bundled:multilingual-e5-small"
    teacher: str = "bundled:smollm2-135m-instruct"
    scifact: int = 300  # SciFact abstracts (the first N of the corpus file)
    langs: tuple[str, ...] = ("es", "ru", "zh", "ar", "hi")  # XQuAD paragraph languages
    per_lang: int = 60  # XQuAD paragraphs per language (a seeded sample; the languages are translations)
    max_length: int = 160  # encoder tokens per passage (special tokens included)
    train_layers: int = 2  # top encoder layers trained with the head
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of steps with a linear warm-up
    heldout: float = 0.05  # share of passages kept out of training to measure agreement
    seed: int = 0
    extra: dict = field(default_factory=dict)


def load_passages(
    data_dir: Path, scifact: int, langs: Sequence[str], per_lang: int = 240, seed: int = 0
) -> list[tuple[str, str]]:
    """(source, text) pairs: SciFact abstracts, then XQuAD paragraphs of each language (a sample of
    `per_lang` per language, drawn with its own seed, so the languages mostly cover different articles)."""
    data_dir = Path(data_dir)
    out: list[tuple[str, str]] = []
    if scifact > 0:
        path = data_dir / "scifact" / "corpus.jsonl"
        if not path.is_file():
            raise InvalidInputError(f"{path}: no such file (SciFact corpus)")
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= scifact:
                    break
                row = json.loads(line)
                text = str(row.get("text", "")).strip()
                if text:
                    out.append(("scifact", text))
    for lang in langs:
        if lang not in XQUAD_LANGS:
            raise InvalidInputError(f"unknown XQuAD language {lang!r}: choose from {', '.join(XQUAD_LANGS)}")
        path = data_dir / "xquad" / f"xquad.{lang}.json"
        if not path.is_file():
            raise InvalidInputError(f"{path}: no such file (XQuAD {lang})")
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        paras = [str(p["context"]).strip() for a in data for p in a["paragraphs"]]
        paras = [t for t in paras if t]
        if per_lang < len(paras):
            picked = sorted(random.Random(f"{seed}:{lang}").sample(range(len(paras)), per_lang))
            paras = [paras[i] for i in picked]
        out.extend((f"xquad-{lang}", t) for t in paras)
    if not out:
        raise InvalidInputError("no training passages: give --scifact > 0 or some --langs")
    return out


def truncate_to_tokens(texts: Sequence[str], tokenizer, limit: int) -> list[str]:
    """Each text cut after the last whole word that fits in `limit` tokens of `tokenizer`."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, offsets in zip(texts, enc["offset_mapping"], strict=True):
        if len(offsets) <= limit:
            out.append(text)
            continue
        end = offsets[limit - 1][1]
        words = [w for w in split_words(text) if w.end <= end]
        out.append(text[: words[-1].end] if words else text[:end])
    return out


def soft_labels(scores: Sequence[float], counts: Sequence[int], rates=TEACHER_RATES) -> list[float]:
    """The share of `rates` at which the teacher keeps each word."""
    if not scores:
        return []
    kept = [0] * len(scores)
    for r in rates:
        for i, k in enumerate(select_words(scores, counts, r)):
            kept[i] += int(k)
    return [k / len(rates) for k in kept]


def teacher_label(
    texts: Sequence[str], teacher, *, batch: int = 16, progress: Callable[[int], None] | None = None
) -> list[list[float]]:
    """Per text, one soft keep label per word (`split_words` order)."""
    labels: list[list[float]] = []
    for b in range(0, len(texts), batch):
        chunk = list(texts[b : b + batch])
        words = [split_words(t) for t in chunk]
        for verdict in teacher.score_words(chunk, words):
            labels.append(soft_labels(verdict.scores, verdict.token_counts))
        if progress is not None:
            progress(len(chunk))
    return labels


def token_targets(texts: Sequence[str], labels: Sequence[Sequence[float]], tokenizer, max_length: int):
    """Encoder inputs with special tokens, and per token the soft label of its word (-1: no word)."""
    enc = tokenizer(
        list(texts),
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
    )
    wrapping = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    rows = []
    for text, word_labels, ids, offsets in zip(
        texts, labels, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        words = split_words(text)
        owners = token_words([tuple(o) for o in offsets], char_to_word(text, words))
        # The wrapping tokens (CLS/SEP, <s>/</s>, padding) have no word; an unknown-token piece does.
        target = [
            -1.0 if (t in wrapping or w < 0) else float(word_labels[w])
            for w, t in zip(owners, ids, strict=True)
        ]
        rows.append((list(ids), target))
    return rows


def _extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 1/0 -> additive (batch, 1, 1, seq) mask for BERT layers."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _pad(rows: Sequence[Sequence], value) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows])


class TopLayers(torch.nn.Module):
    """The trained part of the student: the top encoder layers and the token head."""

    def __init__(self, model, train_layers: int):
        super().__init__()
        layers = model.base_model.encoder.layer
        self.start = len(layers) - train_layers
        self.layers = torch.nn.ModuleList(layers[self.start :])
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ext = _extended_mask(mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(self.dropout(hidden))


@torch.inference_mode()
def frozen_features(model, rows, start_layer: int, batch: int = 32, progress=None) -> list[torch.Tensor]:
    """Hidden states entering layer `start_layer` for each row (fp16, unpadded)."""
    feats: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        ids = _pad([rows[i][0] for i in idx], model.config.pad_token_id or 0)
        mask = _pad([[1] * len(rows[i][0]) for i in idx], 0)
        out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[start_layer]
        for j, i in enumerate(idx):
            feats[i] = hidden[j, : len(rows[i][0])].to(torch.float16).clone()
        if progress is not None:
            progress(len(idx))
    return feats


def _keep_p(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[..., 1]


def agreement(student_p: Sequence[Sequence[float]], teacher: Sequence[Sequence[float]], rate: float = 0.5):
    """Mean over passages of |kept by both| / |kept by teacher| at `rate` (word level, equal token
    counts assumed), and the label correlation."""
    overlaps = []
    xs, ys = [], []
    for s, t in zip(student_p, teacher, strict=True):
        if not t:
            continue
        ones = [1] * len(t)
        ks = select_words(list(s), ones, rate)
        kt = select_words(list(t), ones, rate)
        both = sum(a and b for a, b in zip(ks, kt, strict=True))
        overlaps.append(both / max(sum(kt), 1))
        xs.extend(s)
        ys.extend(t)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    vx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    vy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return {
        "kept_overlap@0.5": round(sum(overlaps) / len(overlaps), 4),
        "pearson": round(cov / (vx * vy), 4) if vx and vy else 0.0,
    }


def train_compressor(cfg: TrainConfig, *, models_dir: Path, show_progress: bool = False, log=print) -> dict:
    """Label, train, measure and save; returns the report (also written to `recipe.json`). `models_dir`
    holds the prepared bundled models (the encoder and the teacher)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kvrag.encoders.models import resolve_model
    from kvrag.rag.compress.selfinfo import SelfInfoCompressor

    if cfg.train_layers < 0:
        raise InvalidInputError("--train-layers must be >= 0")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise InvalidInputError("--epochs and --batch-size must be >= 1")
    if not 0.0 < cfg.heldout < 0.5:
        raise InvalidInputError("--heldout must be in (0, 0.5)")
    t_start = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    models_dir = Path(models_dir)
    enc_path = resolve_model(cfg.encoder, models_dir)
    tokenizer = AutoTokenizer.from_pretrained(enc_path)
    passages = load_passages(cfg.data_dir, cfg.scifact, cfg.langs, cfg.per_lang, cfg.seed)
    texts = truncate_to_tokens([t for _, t in passages], tokenizer, cfg.max_length - 2)
    sources = [s for s, _ in passages]
    log(f"{len(texts)} passages ({', '.join(sorted(set(sources)))})")

    # 1. Teacher labels.
    from kvrag.rag.generation.generator import Generator

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "teacher-labels.jsonl"
    # Labels are appended to the cache batch by batch, so an interrupted run resumes where it stopped.
    found = _load_label_cache(cache)
    keys = [_text_key(t, cfg.teacher) for t in texts]
    todo = [i for i, k in enumerate(keys) if len(found.get(k, ())) != len(split_words(texts[i]))]
    if todo:
        gen = Generator(cfg.teacher, models_dir=models_dir)
        teacher = SelfInfoCompressor(generator=gen)
        with (
            cache.open("a", encoding="utf-8") as fh,
            tqdm(total=len(todo), desc="teacher labels", unit="passage", disable=not show_progress) as bar,
        ):
            for b in range(0, len(todo), 16):
                idx = todo[b : b + 16]
                for i, lab in zip(idx, teacher_label([texts[i] for i in idx], teacher), strict=True):
                    found[keys[i]] = lab
                    fh.write(json.dumps({"key": keys[i], "labels": lab}) + "\n")
                fh.flush()
                bar.update(len(idx))
        del teacher, gen
        done = len(texts) - len(todo)
        log(f"teacher labels: {len(todo)} computed" + (f", {done} taken from {cache}" if done else ""))
    else:
        log(f"teacher labels reused from {cache}")
    labels = [found[k] for k in keys]
    label_s = time.perf_counter() - t0

    # 2. Student inputs and frozen features.
    rows = token_targets(texts, labels, tokenizer, cfg.max_length)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(1, int(len(rows) * cfg.heldout))
    held, train = sorted(order[:n_held]), order[n_held:]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialised" notice is expected here
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            enc_path, num_labels=2, id2label={0: "drop", 1: "keep"}, label2id={"drop": 0, "keep": 1}
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(cfg.seed)
    torch.nn.init.normal_(model.classifier.weight, std=0.02)
    torch.nn.init.zeros_(model.classifier.bias)
    model.eval()
    n_layers = len(model.base_model.encoder.layer)
    if cfg.train_layers > n_layers:
        raise InvalidInputError(f"--train-layers must be <= {n_layers}")
    start = n_layers - cfg.train_layers
    t0 = time.perf_counter()
    with tqdm(total=len(rows), desc="frozen features", unit="passage", disable=not show_progress) as bar:
        feats = frozen_features(model, rows, start, progress=bar.update)
    feature_s = time.perf_counter() - t0

    # 3. Training.
    top = TopLayers(model, cfg.train_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(top.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, cfg.warmup))
    rng = random.Random(cfg.seed + 1)
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    top.train()
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not show_progress)
    for _epoch in range(cfg.epochs):
        # Batches of similar length (less padding), visited in random order.
        by_len = sorted(train, key=lambda i: (len(rows[i][0]), rng.random()))
        batches = [by_len[b : b + cfg.batch_size] for b in range(0, len(by_len), cfg.batch_size)]
        rng.shuffle(batches)
        for idx in batches:
            longest = max(len(rows[i][0]) for i in idx)
            hidden = torch.zeros(len(idx), longest, feats[idx[0]].shape[-1])
            mask = torch.zeros(len(idx), longest, dtype=torch.long)
            target = torch.full((len(idx), longest), -1.0)
            for j, i in enumerate(idx):
                n = len(rows[i][0])
                hidden[j, :n] = feats[i].float()
                mask[j, :n] = 1
                target[j, :n] = torch.tensor(rows[i][1])
            logp = torch.log_softmax(top(hidden, mask).float(), dim=-1)
            valid = target >= 0
            y = target.clamp(min=0)
            loss = -(y * logp[..., 1] + (1 - y) * logp[..., 0])[valid].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    bar.close()
    train_s = time.perf_counter() - t0
    top.eval()

    # 4. Agreement with the teacher on held-out passages (word level).
    student_words, teacher_words = [], []
    with torch.inference_mode():
        enc = tokenizer(
            [texts[i] for i in held],
            add_special_tokens=True,
            truncation=True,
            max_length=cfg.max_length,
            return_offsets_mapping=True,
        )
        for k, i in enumerate(held):
            p = _keep_p(top(feats[i].float()[None], torch.ones(1, len(rows[i][0]), dtype=torch.long)))[0]
            words = split_words(texts[i])
            owners = token_words([tuple(o) for o in enc["offset_mapping"][k]], char_to_word(texts[i], words))
            student_words.append(mean_per_word(owners, p.tolist(), len(words))[0])
            teacher_words.append(labels[i])
    # Baseline for the agreement: keeping words at random (expected overlap = rate).
    report_agree = agreement(student_words, teacher_words)

    # 5. Save: the full checkpoint and the delta of trained tensors.
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prefix = {id(p): n for n, p in model.named_parameters()}
    delta = {prefix[id(p)]: p.detach().to(torch.float16).contiguous() for p in top.parameters()}
    save_file(delta, str(out / "delta.safetensors"), metadata={"format": "pt"})
    report = {
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "out", "extra")}},
        "passages": {"train": len(train), "heldout": len(held), "by_source": dict(Counter(sources))},
        "tokens": {"train": sum(len(rows[i][0]) for i in train)},
        "final_loss": round(sum(losses[-50:]) / max(len(losses[-50:]), 1), 4),
        "heldout_agreement": report_agree,
        "random_overlap@0.5": 0.5,
        "trained_parameters": sum(p.numel() for p in params),
        "delta_bytes": (out / "delta.safetensors").stat().st_size,
        "seconds": {
            "teacher_labels": round(label_s, 1),
            "frozen_features": round(feature_s, 1),
            "training": round(train_s, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **cfg.extra,
    }
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _text_key(text: str, teacher: str) -> str:
    import hashlib

    return hashlib.sha256(f"{teacher}\0{text}".encode()).hexdigest()


def _load_label_cache(path: Path) -> dict[str, list[float]]:
    """Every complete entry of a label cache (a line cut short by an interrupted run is skipped)."""
    found: dict[str, list[float]] = {}
    for row in cached_rows(path):
        try:
            found[str(row["key"])] = [float(x) for x in row["labels"]]
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _cached_labels(path: Path, texts: Sequence[str], teacher: str) -> list[list[float]] | None:
    """The teacher labels a previous run saved for exactly these texts (same teacher), else None."""
    found = _load_label_cache(path)
    keys = [_text_key(t, teacher) for t in texts]
    if not all(k in found for k in keys):
        return None
    labels = [found[k] for k in keys]
    if any(len(lab) != len(split_words(t)) for lab, t in zip(labels, texts, strict=True)):
        return None
    return labels


def _save_labels(path: Path, texts: Sequence[str], labels: Sequence[Sequence[float]], teacher: str) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for t, lab in zip(texts, labels, strict=True):
            fh.write(json.dumps({"key": _text_key(t, teacher), "labels": list(lab)}) + "\n")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.compressor",
        description="Distil the selfinfo compressor into a token classifier on the bundled multilingual-e5-small.",
    )
    p.add_argument("--data-dir", default="../shared/data", help="folder with scifact/ and xquad/")
    p.add_argument("--out", required=True, help="output folder (checkpoint, delta.safetensors, recipe.json)")
    p.add_argument("--scifact", type=int, default=300, help="SciFact abstracts used (the first N)")
    p.add_argument(
        "--langs", default="es,ru,zh,ar,hi", help="XQuAD paragraph languages (keep out the evaluated ones)"
    )
    p.add_argument("--per-lang", type=int, default=60, help="XQuAD paragraphs per language (a seeded sample)")
    p.add_argument("--max-length", type=int, default=160, help="encoder tokens per passage")
    p.add_argument("--train-layers", type=int, default=2, help="top encoder layers trained with the head")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(
            f"error: {data_dir}: no such folder (give --data-dir, the benchmark data folder)", file=sys.stderr
        )
        return 2
    cfg = TrainConfig(
        data_dir=data_dir,
        out=Path(args.out),
        scifact=args.scifact,
        langs=tuple(x.strip() for x in args.langs.split(",") if x.strip()),
        per_lang=args.per_lang,
        max_length=args.max_length,
        train_layers=args.train_layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        extra={"command": command_line("training.compressor", argv)},
    )
    return run_job(train_compressor, cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
