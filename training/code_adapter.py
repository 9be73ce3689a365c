"""Training the LoRA code adapter on the bundled multilingual-e5-small (`bundled:code-e5-small`).

    python -m training.code_adapter --out encoders/adapters/code-e5-small --threads 2 \
        --teacher bundled:all-minilm-l6-v2 --teacher bundled:multilingual-e5-small [--json]

Data: (docstring -> code) and (split name -> code) pairs mined from the Python sources on the machine
(`training.code_pairs`), CoSQA's functions left out.

Model. LoRA (`peft`) on the attention projections (and the feed-forward layers) of every encoder layer,
trained with in-batch negatives (MultipleNegativesRankingLoss: cross-entropy over the batch's scaled
query-code cosine similarities) summed over Matryoshka truncations (384/256/128/64, renormalised), so
truncated vectors in our indexes keep working. With `--teacher`, the KL divergence from the teachers'
mean scores over each batch is added (distillation). Queries get the encoder's `query: ` prompt, code
its `passage: ` prompt, pooling is the mean over tokens as in e5. Seeded: the same torch build and
thread count give the same adapter bit for bit.

Output: the adapter folder (`adapter_config.json`, `adapter_model.safetensors`, a few MB), `recipe.json`
and a model card (`README.md`). The package loads the committed one (`kvrag.encoders.lora`), and any
adapter folder is an encoder spec (`--encoder DIR`), merged into the base it names.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrag.encoders.lora import NAME
from kvrag.errors import InvalidInputError
from training.code_pairs import MiningStats, Pair, default_roots, mine_pairs
from training.common import add_common_args, command_line, kvrag_home, run_job, warmup_cosine

DEFAULT_COSQA = Path("../shared/data/cosqa/corpus.jsonl")


@dataclass
class AdapterConfig:
    """`python -m training.code_adapter` options. The defaults train in about half an hour on 2 CPU cores."""

    out: Path
    base: str = "bundled:multilingual-e5-small"
    cosqa: Path | None = DEFAULT_COSQA
    roots: tuple[str, ...] = ()  # empty: stdlib + site-packages
    include_tests: bool = False
    # keep the docstring minus its first paragraph (the query) on the code side; False: no docstring
    docstring_rest: bool = True
    max_pairs: int = 3000
    name_pairs_weight: float = 0.3  # loss weight of the name -> code task (0: no name pairs)
    name_pairs_share: float = 0.2  # at most this share of the pairs are name pairs
    heldout: int = 200  # docstring pairs kept out of training to measure retrieval
    epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: float = 0.1
    rank: int = 16
    alpha: int = 32
    lora_dropout: float = 0.05
    attention_dropout: float = 0.0  # see load_base: memory-efficient attention needs it off
    ffn: bool = True  # LoRA on the feed-forward layers too, not only attention
    dims: tuple[int, ...] = (384, 256, 128, 64)
    scale: float = 20.0
    query_max_length: int = 64
    code_max_length: int = 256
    seed: int = 0
    max_steps: int | None = None  # stop early (timing probes, tests)
    # recompute each layer's activations in the backward pass: a third more compute, a fraction of
    # the memory (the same weights: tested)
    gradient_checkpointing: bool = False
    # distillation: encoders (model specs) whose mean cosine scores over each batch's queries x codes
    # the student's scores should match (KL of the softmaxes, at every Matryoshka dim), on top of the
    # ranking loss. Their embeddings of the training pairs are computed once, before training.
    teachers: tuple[str, ...] = ()
    distill_weight: float = 1.0
    teacher_scale: float = 20.0  # softmax scale of the teachers' mean cosine
    extra: dict = field(default_factory=dict)


def target_modules(ffn: bool) -> str:
    """peft regex for the attention projections (and feed-forward layers) of each BERT-style layer."""
    parts = r"attention\.self\.(query|key|value)|attention\.output\.dense"
    if ffn:
        parts += r"|intermediate\.dense|output\.dense"
    return rf"(.*\.)?encoder\.layer\.\d+\.({parts})"


def read_prompts(folder: str | Path) -> dict[str, str]:
    """The query/passage prompts of a sentence-transformers folder (e5's `query: ` / `passage: `)."""
    path = Path(folder) / "config_sentence_transformers.json"
    prompts = {}
    if path.is_file():
        prompts = json.loads(path.read_text(encoding="utf-8")).get("prompts") or {}
    return {"query": prompts.get("query", ""), "passage": prompts.get("passage", prompts.get("document", ""))}


def load_base(folder: str | Path, *, attention_dropout: float | None = None):
    """(model, tokenizer) of an encoder folder, the transformer part only (pooling is ours).

    `attention_dropout` overrides the config's attention-probability dropout. Training sets it to 0:
    with dropout on the attention weights PyTorch's CPU attention falls back to materialising every
    (batch, heads, tokens, tokens) matrix, which at 32 x 256 tokens nearly doubles the step's memory
    and time."""
    from transformers import AutoModel, AutoTokenizer

    kwargs = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    return AutoModel.from_pretrained(str(folder), **kwargs), AutoTokenizer.from_pretrained(str(folder))


def add_lora(model, cfg: AdapterConfig):
    """Wrap `model` in a fresh LoRA adapter (seeded initialisation)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg.ffn),
        bias="none",
    )
    return get_peft_model(model, lora)


def mean_pool(model, input_ids, attention_mask):
    """Mean of the last hidden states over real tokens (sentence-transformers' mean pooling)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _tokenize(tokenizer, texts: Sequence[str], prompt: str, max_length: int) -> list[list[int]]:
    return tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length)["input_ids"]


def _pad(tokenizer, rows: Sequence[Sequence[int]]):
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    return ids, mask


def embed(model, tokenizer, texts: Sequence[str], prompt: str, max_length: int, batch: int = 32):
    """L2-normalised float32 embeddings (torch) of `texts` with `prompt`, in inference mode."""
    import torch

    rows = _tokenize(tokenizer, texts, prompt, max_length)
    out = []
    with torch.inference_mode():
        for b in range(0, len(rows), batch):
            ids, mask = _pad(tokenizer, rows[b : b + batch])
            out.append(torch.nn.functional.normalize(mean_pool(model, ids, mask).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0)


def matryoshka_mnrl_loss(q, c, dims: Sequence[int], scale: float = 20.0, weights=None):
    """Sum over `dims` of MultipleNegativesRankingLoss: row i of the scaled cosine matrix of the
    first `d` components of queries `q` and codes `c` (renormalised) should pick column i.
    `weights` (one per row) weigh the rows' cross-entropies (a weighted mean)."""
    import torch
    import torch.nn.functional as F

    target = torch.arange(q.shape[0])
    total = q.new_zeros(())
    for logits in _truncated_logits(q, c, dims, scale):
        ce = F.cross_entropy(logits, target, reduction="none")
        total = total + (ce.mean() if weights is None else (ce * weights).sum() / weights.sum())
    return total


def _truncated_logits(q, c, dims: Sequence[int], scale: float):
    """For each d in `dims`: `scale` x the cosine of the first d components of queries x codes."""
    import torch.nn.functional as F

    for d in dims:
        yield scale * F.normalize(q[:, :d], dim=-1) @ F.normalize(c[:, :d], dim=-1).T


def distill_loss(q, c, teacher_scores, dims: Sequence[int], scale: float = 20.0, teacher_scale: float = 20.0):
    """Sum over `dims` of the row-wise KL divergence from the teachers' distribution over the batch's
    codes (softmax of `teacher_scale` x their scores, one row per query) to the student's (softmax of
    `scale` x the cosine of the first `d` components), averaged over rows."""
    import torch.nn.functional as F

    target = F.log_softmax(teacher_scale * teacher_scores, dim=-1)
    total = q.new_zeros(())
    for logits in _truncated_logits(q, c, dims, scale):
        student = F.log_softmax(logits, dim=-1)
        total = total + F.kl_div(student, target, log_target=True, reduction="batchmean")
    return total


def teacher_embeddings(
    specs: Sequence[str],
    pairs: Sequence[Pair],
    *,
    models_dir: Path,
    embedding_cache: Path | None = None,
    show_progress: bool = False,
):
    """Each teacher's normalised (query, code) embeddings of `pairs`, as float32 tensors. With an
    `embedding_cache` (the product's SQLite cache) a second run on the same pairs encodes nothing."""
    import torch

    from kvrag.encoders.encoder import EncoderConfig, load_encoder

    out = []
    for spec in specs:
        enc = load_encoder(EncoderConfig(model=spec, models_dir=Path(models_dir), cache_path=embedding_cache))
        q = enc.encode([p.query for p in pairs], kind="query", show_progress=show_progress)
        c = enc.encode([p.code for p in pairs], kind="passage", show_progress=show_progress)
        out.append((torch.from_numpy(q.copy()), torch.from_numpy(c.copy())))
    return out


def teacher_batch_scores(teachers, rows: Sequence[int], codes: Sequence[int]):
    """The teachers' mean cosine of queries `rows` x codes `codes`."""
    rows, codes = list(rows), list(codes)
    return sum(tq[rows] @ tc[codes].T for tq, tc in teachers) / len(teachers)


def retrieval_scores(q, c) -> dict[str, float]:
    """MRR@10 and recall@1 of query i finding code i among all codes (normalised embeddings)."""
    import torch

    sims = q @ c.T
    rank = (sims > sims.diag().unsqueeze(1)).sum(1)  # codes scoring above the right one
    mrr = torch.where(rank < 10, 1.0 / (rank + 1).float(), torch.zeros_like(rank, dtype=torch.float))
    return {"mrr@10": round(float(mrr.mean()), 4), "recall@1": round(float((rank == 0).float().mean()), 4)}


def evaluate(model, tokenizer, pairs: Sequence[Pair], prompts: dict[str, str], cfg: AdapterConfig) -> dict:
    """Retrieval among the given pairs at the full and the smallest Matryoshka dimension."""
    import torch

    was_training = model.training
    model.eval()
    q = embed(model, tokenizer, [p.query for p in pairs], prompts["query"], cfg.query_max_length)
    c = embed(model, tokenizer, [p.code for p in pairs], prompts["passage"], cfg.code_max_length)
    model.train(was_training)
    out = {}
    for d in sorted({q.shape[1], min(cfg.dims)}, reverse=True):
        qd = torch.nn.functional.normalize(q[:, :d], dim=-1)
        cd = torch.nn.functional.normalize(c[:, :d], dim=-1)
        out[str(d)] = retrieval_scores(qd, cd)
    return out


def make_batches(code_lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of pair indices, in random order: random pairs, drawn from windows of 8
    batches sorted by code length (less padding)."""
    order = list(range(len(code_lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    window = 8 * batch_size
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: code_lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def fit(
    model,
    tokenizer,
    pairs: Sequence[Pair],
    cfg: AdapterConfig,
    prompts: dict[str, str],
    *,
    teachers=None,
    show_progress: bool = False,
) -> list[float]:
    """Train the LoRA parameters of `model` on `pairs`; returns the loss of each step. `teachers` (see
    `teacher_embeddings`) adds the distillation loss."""
    import torch
    from tqdm.auto import tqdm

    dims = [d for d in cfg.dims if d <= model.config.hidden_size] or [model.config.hidden_size]
    q_rows = _tokenize(tokenizer, [p.query for p in pairs], prompts["query"], cfg.query_max_length)
    c_rows = _tokenize(tokenizer, [p.code for p in pairs], prompts["passage"], cfg.code_max_length)
    weights = torch.tensor([1.0 if p.task == "doc" else cfg.name_pairs_weight for p in pairs])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup))
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)  # dropout masks
    losses: list[float] = []
    if cfg.gradient_checkpointing:
        _set_checkpointing(model.get_base_model(), True)
    model.train()
    bar = tqdm(total=total, desc="training", unit="step", disable=not show_progress)
    for _epoch in range(cfg.epochs):
        batches = make_batches([len(r) for r in c_rows], cfg.batch_size, rng)
        for idx in batches:
            if len(idx) < 2 or len(losses) >= total:
                continue  # one pair has no in-batch negative
            qi, qm = _pad(tokenizer, [q_rows[i] for i in idx])
            ci, cm = _pad(tokenizer, [c_rows[i] for i in idx])
            q = mean_pool(model, qi, qm)
            c = mean_pool(model, ci, cm)
            w = weights[idx]
            loss = matryoshka_mnrl_loss(q, c, dims, cfg.scale, None if bool((w == 1).all()) else w)
            if teachers:
                t = teacher_batch_scores(teachers, idx, idx)
                loss = loss + cfg.distill_weight * distill_loss(q, c, t, dims, cfg.scale, cfg.teacher_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    bar.close()
    if cfg.gradient_checkpointing:
        _set_checkpointing(model.get_base_model(), False)
    model.eval()
    return losses


def _set_checkpointing(model, on: bool) -> None:
    """Turn activation checkpointing of a transformers model on or off. Non-reentrant: gradients
    reach the LoRA weights although the inputs (token ids) need none, and dropout masks are replayed
    identically in the recomputation."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of the same switch
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_code_adapter(
    cfg: AdapterConfig,
    *,
    models_dir: Path,
    embedding_cache: Path | None = None,
    pairs: Sequence[Pair] | None = None,
    show_progress: bool = False,
    log: Callable[..., None] = print,
) -> dict:
    """Mine, train, measure and save the adapter; returns the report (also written to `recipe.json`).

    `models_dir` holds the prepared bundled models (the base and the teachers); `embedding_cache`
    (optional) caches the teachers' embeddings; `pairs` skips mining (tests, or a fixed data set)."""
    import peft
    import torch
    from tqdm.auto import tqdm

    from kvrag.encoders.models import resolve_model

    models_dir = Path(models_dir)
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise InvalidInputError("--epochs must be >= 1 and --batch-size >= 2")
    if cfg.rank < 1:
        raise InvalidInputError("--rank must be >= 1")
    if cfg.teachers and not cfg.distill_weight > 0:
        raise InvalidInputError("--distill-weight must be > 0 with --teacher")
    for spec in cfg.teachers:  # a bad spec fails here, not after minutes of mining
        resolve_model(spec, models_dir)
    t_start = time.perf_counter()
    stats = MiningStats()
    if pairs is None:
        cosqa = Path(cfg.cosqa) if cfg.cosqa else None
        if cosqa is not None and not cosqa.is_file():
            raise InvalidInputError(
                f"{cosqa}: no such file (give --cosqa, the CoSQA corpus.jsonl to exclude)"
            )
        roots = [Path(r) for r in cfg.roots] or default_roots()
        with tqdm(desc="mining", unit="file", disable=not show_progress) as bar:
            pairs = mine_pairs(
                roots,
                exclude_corpus=cosqa,
                max_pairs=cfg.max_pairs + cfg.heldout,
                seed=cfg.seed,
                name_pairs=cfg.name_pairs_weight > 0,
                name_pairs_share=cfg.name_pairs_share * cfg.max_pairs / (cfg.max_pairs + cfg.heldout),
                include_tests=cfg.include_tests,
                docstring_rest=cfg.docstring_rest,
                stats=stats,
                progress=bar.update,
            )
        log(f"mined {len(pairs)} pairs from {stats.files} files in {stats.seconds} s")
    pairs = list(pairs)
    doc_idx = [i for i, p in enumerate(pairs) if p.task == "doc"]
    n_held = min(cfg.heldout, len(doc_idx) // 5)
    held_set = set(random.Random(cfg.seed + 2).sample(doc_idx, n_held)) if n_held >= 2 else set()
    held = [pairs[i] for i in sorted(held_set)]
    train = [p for i, p in enumerate(pairs) if i not in held_set]
    if len(train) < 2:
        raise InvalidInputError("fewer than 2 training pairs: widen the roots or raise --max-pairs")

    torch.manual_seed(cfg.seed)
    base_path = resolve_model(cfg.base, models_dir)
    model, tokenizer = load_base(base_path, attention_dropout=cfg.attention_dropout)
    prompts = read_prompts(base_path)
    model = add_lora(model, cfg)
    t0 = time.perf_counter()
    with model.disable_adapter():
        before = evaluate(model, tokenizer, held, prompts, cfg) if held else {}
        eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teachers = None
    if cfg.teachers:
        teachers = teacher_embeddings(
            cfg.teachers,
            train,
            models_dir=models_dir,
            embedding_cache=embedding_cache,
            show_progress=show_progress,
        )
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = fit(model, tokenizer, train, cfg, prompts, teachers=teachers, show_progress=show_progress)
    train_s = time.perf_counter() - t0
    after = evaluate(model, tokenizer, held, prompts, cfg) if held else {}

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = cfg.base
    model.save_pretrained(str(out))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    every = max(1, len(losses) // 20)
    report = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(cfg).items()
            if k not in ("out", "extra")
        },
        "mining": asdict(stats),
        "pairs": {
            "train": len(train),
            "train_name_pairs": sum(p.task == "name" for p in train),
            "heldout": len(held),
        },
        "heldout_retrieval": {"base": before, "adapter": after},
        "steps": len(losses),
        "loss_first": round(sum(losses[:every]) / every, 4) if losses else None,
        "loss_final": round(sum(losses[-every:]) / every, 4) if losses else None,
        "loss_curve": [
            round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4)
            for i in range(0, len(losses), every)
        ],
        "trainable_parameters": trainable,
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "seconds": {
            "mining": stats.seconds,
            "eval_base": round(eval_s, 1),
            "teachers": round(teacher_s, 1),
            "training": round(train_s, 1),
            "steps_per_s": round(len(losses) / train_s, 4) if train_s > 0 else None,
            "total": round(time.perf_counter() - t_start, 1),
        },
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        **cfg.extra,
    }
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(report), encoding="utf-8")  # replaces peft's template
    return report


def model_card(report: dict) -> str:
    """A short README for the adapter folder: what it is, how it was made, what it measured."""
    cfg, held = report["config"], report["heldout_retrieval"]

    def row(name: str, scores: dict) -> str:
        return (
            f"| {name} | "
            + " | ".join(f"{scores[d]['mrr@10']:.4f}" for d in sorted(scores, key=int, reverse=True))
            + " |"
        )

    dims = sorted(held["base"], key=int, reverse=True) if held.get("base") else []
    table = (
        "\n".join(
            [
                "| held-out docstring -> code, MRR@10 | " + " | ".join(f"{d} dims" for d in dims) + " |",
                "|---|" + "---|" * len(dims),
                row("base model", held["base"]),
                row("with this adapter", held["adapter"]),
            ]
        )
        if dims
        else "(no held-out pairs)"
    )
    teachers = cfg.get("teachers") or ()
    distilled = (
        f" plus distillation from {' + '.join(f'`{t}`' for t in teachers)} (weight {cfg['distill_weight']})"
        if teachers
        else ""
    )
    return f"""# {NAME}: a LoRA code adapter for {cfg["base"]}

`bundled:{NAME}` = the base encoder with this adapter merged in: queries get the `query: ` prompt,
code the `passage: ` prompt, mean pooling, trained with a Matryoshka loss over {cfg["dims"]} dims.

Made by `{report.get("command", "python -m training.code_adapter")}` in {report["seconds"]["total"]:.0f} s
({report["threads"]} CPU thread(s), torch {report["torch"]}, peft {report["peft"]}): {report["pairs"]["train"]}
(docstring or comment -> code) and (split name -> code) pairs mined from {report["mining"]["files"]} Python files
of the standard library and installed packages, CoSQA's functions left out ({report["mining"]["excluded_cosqa"]}
excluded), {report["steps"]} steps of in-batch-negative ranking loss{distilled} (loss {report["loss_first"]} -> {report["loss_final"]}).
Every option and count is in `recipe.json`.

{table}
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.code_adapter",
        description="Train a LoRA code adapter on the bundled multilingual-e5-small from docstring -> code "
        "pairs mined from the installed Python sources.",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (adapter_config.json, adapter_model.safetensors, recipe.json); "
        "encoders/adapters/code-e5-small for bundled:code-e5-small",
    )
    p.add_argument(
        "--max-pairs", type=int, default=3000, help="training pairs (a seeded sample of those mined)"
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (in-batch negatives)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cosqa",
        default=str(DEFAULT_COSQA),
        help="CoSQA corpus whose functions are kept out of training ('' to keep none out)",
    )
    p.add_argument(
        "--name-pairs-weight", type=float, default=0.3, help="loss weight of the name -> code pairs (0: none)"
    )
    p.add_argument(
        "--root",
        action="append",
        help="folder of Python files to mine (repeatable; default: stdlib + site-packages)",
    )
    p.add_argument(
        "--drop-docstring",
        action="store_true",
        help="remove the whole docstring from the code side (default: remove only its first paragraph, "
        "which becomes the query, and keep the rest)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: about a third slower, a fraction of the memory",
    )
    p.add_argument(
        "--teacher",
        action="append",
        help="encoder spec to distil from (repeatable: their mean score): the adapter also learns to "
        "rank each batch's codes the way the teachers score them",
    )
    p.add_argument(
        "--distill-weight", type=float, default=1.0, help="weight of the distillation loss (with --teacher)"
    )
    p.add_argument("--max-steps", type=int, help="stop after this many steps (timing probes)")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    cfg = AdapterConfig(
        out=Path(args.out),
        cosqa=Path(args.cosqa) if args.cosqa else None,
        roots=tuple(args.root or ()),
        max_pairs=args.max_pairs,
        docstring_rest=not args.drop_docstring,
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
        extra={"command": command_line("training.code_adapter", argv)},
    )
    # the product's embedding cache: teachers' embeddings of the same pairs are computed once
    return run_job(
        train_code_adapter, cfg, args, embedding_cache=kvrag_home() / "cache" / "embeddings.sqlite"
    )


if __name__ == "__main__":
    raise SystemExit(main())
