"""Search queries written by a small instruction-tuned LLM for code-adapter training pairs.

Mined pairs give a function's docstring summary as its query ("Return the current working
directory."), while people search for code the way they type into a web search box ("python get
current working directory", "how to check if file exists in python"). `write_queries` turns each
description into such a search with the bundled generator (SmolLM2-135M-Instruct by default),
prompted with a few fixed examples and decoded greedily, so a run is reproducible.

Small models sometimes answer with something that is not a search (`python set set`, the prompt's
own labels, a whole sentence). `clean_query` lower-cases the first line of an answer and rejects
those; a rejected answer is returned as "" and the caller keeps its own fallback.

Answers are cached in a JSON Lines file keyed by the model, the prompt version and the description,
so a rerun of the same recipe writes nothing again. The cache holds plain strings only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from kvrag.encoders.training import cached_rows
from kvrag.errors import InvalidInputError

DEFAULT_WRITER = "bundled:smollm2-135m-instruct"
PROMPT_VERSION = "search-v1"

_INSTRUCTION = "Turn a function description into the short web search a Python programmer would type.\n"
_SHOTS = (
    ("Read all lines of a text file into a list.", "python read file lines into list"),
    ("Return True if the string contains only digits.", "how to check if string is number python"),
    ("Sort a dictionary by its values in descending order.", "python sort dict by value descending"),
    ("Join two paths, normalising separators.", "join path in python"),
    ("Compute the median of a sequence of numbers.", "median of list python"),
)
_LABELS = ("description:", "search:", "function:", "answer:", "query:")
_WORD = re.compile(r"[a-z0-9_][a-z0-9_'+#.-]*")


def prompt_for(description: str, max_words: int = 40) -> str:
    """The few-shot prompt that asks for one search query for `description`."""
    text = " ".join(description.split()[:max_words])
    shots = "".join(f"Description: {d}\nSearch: {s}\n" for d, s in _SHOTS)
    return f"{_INSTRUCTION}{shots}Description: {text}\nSearch:"


def clean_query(answer: str, *, min_words: int = 2, max_words: int = 14) -> str:
    """The search in a generator's answer: its first line, lower-case, quotes and trailing
    punctuation dropped. "" when it is not a usable search: fewer than `min_words` or more than
    `max_words` words, a word said twice in a row or any word three times, the prompt's labels, or
    the shots' own searches repeated."""
    line = answer.strip().split("\n", 1)[0].strip().strip("\"'`").rstrip(".!?;:,").strip().lower()
    if not line or any(label in line for label in _LABELS):
        return ""
    if line in {s for _, s in _SHOTS}:
        return ""
    words = _WORD.findall(line)
    if not min_words <= len(words) <= max_words:
        return ""
    if any(a == b for a, b in zip(words, words[1:], strict=False)):
        return ""
    if max(words.count(w) for w in set(words)) >= 3:
        return ""
    tokens = line.split()
    if len(tokens) > 2 and tokens[0] == tokens[-1] == "python":  # "python x python": once is enough
        tokens = tokens[:-1]
    return " ".join(tokens)


def _key(model_id: str, description: str) -> str:
    return hashlib.sha1(f"{model_id}\0{PROMPT_VERSION}\0{description}".encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, str]:
    rows = cached_rows(path)
    return {r["k"]: r["q"] for r in rows if isinstance(r.get("k"), str) and isinstance(r.get("q"), str)}


def hf_generate(path: str, *, max_new_tokens: int = 16) -> Callable[[list[str]], list[str]]:
    """A batch generator over a local causal-LM folder: greedy, left-padded, answers only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(prompts: list[str]) -> list[str]:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def write_queries(
    descriptions: Sequence[str],
    *,
    writer: str = DEFAULT_WRITER,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    generate: Callable[[list[str]], list[str]] | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[str]:
    """One search query per description ("" where the writer gave no usable one), in order.

    `writer` is a model spec (resolved through the models folder); `generate` replaces the model
    (a function from prompts to answers, for tests). Cached answers are reused, new ones appended to
    `cache_path` after every batch, so an interrupted run loses at most one batch."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, not {batch_size}")
    cache = _read_cache(Path(cache_path)) if cache_path else {}
    keys = [_key(writer, d) for d in descriptions]
    todo = {k: d for k, d in zip(keys, descriptions, strict=True) if k not in cache}
    todo = sorted(todo.items(), key=lambda kd: (len(kd[1]), kd[0]))  # similar lengths: less padding
    if progress is not None:
        progress(len(descriptions) - len(todo))
    if todo:
        if generate is None:
            from kvrag.encoders.models import resolve_model
            from kvrag.service.settings import get_settings

            generate = hf_generate(resolve_model(writer, get_settings().models_dir))
        if cache_path:
            Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            answers = generate([prompt_for(d) for _, d in chunk])
            if len(answers) != len(chunk):
                raise RuntimeError(f"the writer gave {len(answers)} answers for {len(chunk)} prompts")
            rows = [(k, clean_query(a)) for (k, _), a in zip(chunk, answers, strict=True)]
            cache.update(rows)
            if cache_path:
                with open(cache_path, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps({"k": k, "q": q}) + "\n" for k, q in rows)
            if progress is not None:
                progress(len(chunk))
    return [cache[k] for k in keys]
