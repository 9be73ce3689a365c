"""A code encoder of our own: a LoRA adapter on the bundled multilingual-e5-small (`kvrag train code-adapter`).

Data. (query, code) pairs are mined from the Python sources on the machine (the standard library and
the installed site-packages) with `ast`: the query is the first paragraph (or sentence) of a function's
or class's docstring, or the comment block just above it; the code is its source with decorators,
signature and body but without the docstring. A second, weaker task pairs a function's name split into
words (`read_csv_file` -> "read csv file") with its code. Pairs are deduplicated on a normalised code
hash (docstrings, comments and layout ignored) and on a normalised query, and every function that also
appears in the CoSQA corpus (same normalised code, or same name and body) is left out, so that
evaluating on CoSQA stays clean.

Model. LoRA (`peft`) on the attention projections (and the feed-forward layers) of every encoder layer,
trained with in-batch negatives (MultipleNegativesRankingLoss: cross-entropy over the batch's scaled
query-code cosine similarities) summed over Matryoshka truncations (384/256/128/64, renormalised), so
truncated vectors in our indexes keep working. Queries get the encoder's `query: ` prompt, code its
`passage: ` prompt, pooling is the mean over tokens as in e5. Seeded: the same torch build and thread
count give the same adapter bit for bit.

Output: the adapter folder (`adapter_config.json`, `adapter_model.safetensors`, a few MB) and
`recipe.json`. `bundled:code-e5-small` merges the committed adapter into the base weights once and
saves an ordinary sentence-transformers folder, rebuilt whenever the adapter changes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from kvrag.encoders.codetext import split_identifier, summarise_docstring
from kvrag.encoders.models import marker_matches, staged_folder
from kvrag.encoders.query_writer import DEFAULT_WRITER, write_queries
from kvrag.encoders.training import warmup_cosine
from kvrag.errors import InvalidInputError, ModelNotFoundError

NAME = "code-e5-small"
ADAPTER_DIR = Path(__file__).resolve().parent / "adapters" / NAME
DEFAULT_COSQA = Path("../shared/data/cosqa/corpus.jsonl")
Task = Literal["doc", "name"]

# Comment blocks that say nothing about what the code does.
_NOISE_COMMENT = re.compile(
    r"^(copied from|type:|noqa|pragma|pylint|fmt:|mypy|isort|flake8|ruff|-\*-|!|copyright|licen[cs]ed?|spdx)",
    re.IGNORECASE,
)
_TRIPLE_STRING = re.compile(r"[rRbBuU]{0,2}(\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?''')")
_SPACE = re.compile(r"\s+")
_TEST_DIRS = {"test", "tests", "testing", "idle_test", "unittests"}


# ---------------------------------------------------------------------------------------------------
# Mining


@dataclass(frozen=True)
class Pair:
    """One training example: a natural-language query and the code it describes."""

    query: str
    code: str
    task: Task = "doc"
    name: str = ""
    source: str = ""  # path:line


@dataclass
class MiningStats:
    """What the miner saw and why it dropped what it dropped."""

    files: int = 0
    files_unparsable: int = 0
    functions: int = 0  # functions and classes seen
    no_query: int = 0  # neither a usable docstring/comment nor a usable name
    too_short: int = 0
    too_long: int = 0
    code_unparsable: int = 0  # the code side did not parse after the docstring was cut out
    excluded_cosqa: int = 0
    duplicate_code: int = 0
    duplicate_query: int = 0
    candidates_doc: int = 0
    candidates_name: int = 0
    pairs_doc: int = 0
    pairs_name: int = 0
    cosqa_functions: int = 0
    cosqa_unparsable: int = 0
    seconds: float = 0.0


def _usable_query(text: str, min_words: int) -> bool:
    if not text or text.startswith((":param", ":return", "Args:", "Parameters", ">>>", "..", "@")):
        return False
    return len(re.findall(r"[A-Za-z]{2,}", text)) >= min_words


def _strip_comments_text(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def text_key(code: str) -> str:
    """Hash of code with its first triple-quoted string (the docstring), comments and all whitespace
    removed: a fallback identity for code that `ast` cannot parse."""
    m = re.search(r"\b(def|class)\b", code)
    code = code[m.start() :] if m else code
    norm = _SPACE.sub("", _strip_comments_text(_TRIPLE_STRING.sub("", code, count=1)))
    return "T" + hashlib.sha1(norm.encode()).hexdigest()


def _body_without_docstring(node: ast.AST) -> list[ast.stmt]:
    body = list(node.body)  # type: ignore[attr-defined]
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return body


def ast_keys(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> tuple[str, str]:
    """(code key, name+body key): hashes of the canonical source (`ast.unparse`: layout, comments and
    quotes normalised) without decorators and docstring, and of the name with the body alone."""
    body = "\n".join(ast.unparse(s) for s in _body_without_docstring(node))
    bare = copy.copy(node)  # shallow: the parsed tree is left as it is
    bare.body, bare.decorator_list = [], []
    header = ast.unparse(bare)
    code = hashlib.sha1(f"{header}\n{body}".encode()).hexdigest()
    name_body = hashlib.sha1(f"{node.name}\0{body}".encode()).hexdigest()
    return "A" + code, "N" + name_body


def _first_def(text: str) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | None:
    import textwrap

    tree = ast.parse(textwrap.dedent(text))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return node
    return None


def load_exclusions(corpus: str | Path, stats: MiningStats | None = None) -> set[str]:
    """The identity keys of every function in a BEIR-format code corpus (CoSQA's `corpus.jsonl`)."""
    path = Path(corpus)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file (the CoSQA corpus to keep out of training)")
    keys: set[str] = set()
    stats = stats if stats is not None else MiningStats()
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            text = str(json.loads(line).get("text", ""))
            stats.cosqa_functions += 1
            keys.add(text_key(text))
            try:
                node = _first_def(text)
            except (SyntaxError, ValueError):
                node = None
            if node is None:
                stats.cosqa_unparsable += 1
                continue
            keys.update(ast_keys(node))
    return keys


def default_roots() -> list[Path]:
    """The standard library and the installed pure-Python site-packages of this interpreter."""
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return [r for i, r in enumerate(roots) if r.is_dir() and r not in roots[:i]]


def iter_python_files(root: Path, include_tests: bool = False) -> Iterator[Path]:
    """`*.py` files under `root` in sorted order, skipping test folders (unless asked) and, inside the
    standard library, its own site-packages (mined as a root of its own where wanted)."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name, reverse=True)
        except OSError:
            continue
        files, dirs = [], []
        for p in entries:
            if p.is_symlink():
                continue
            if p.is_dir():
                if p.name in ("site-packages", "dist-packages", "__pycache__"):
                    continue
                if not include_tests and p.name in _TEST_DIRS:
                    continue
                dirs.append(p)
            elif p.suffix == ".py":
                if not include_tests and (p.name.startswith("test_") or p.name.endswith("_test.py")):
                    continue
                files.append(p)
        yield from reversed(files)
        stack.extend(dirs)  # reverse-sorted, so popping visits them in sorted order


@dataclass
class _Candidate:
    query: str
    code: str
    task: Task
    name: str
    source: str
    keys: tuple[str, ...]
    query_key: str


def _leading_comment(lines: list[str], start: int) -> str:
    """The contiguous `#` comment block right above line `start` (1-based), as one line."""
    out: list[str] = []
    i = start - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        out.append(lines[i].strip().lstrip("#").strip())
        i -= 1
    out.reverse()
    if not out or any(_NOISE_COMMENT.match(c) for c in out if c):
        return ""
    return _SPACE.sub(" ", " ".join(out)).strip()


def _cut_indent(line: str, n: int) -> str:
    head = line[:n]
    return line[n:] if not head.strip() else line  # lines inside multi-line strings may sit further left


def extract_candidates(
    text: str,
    source: str,
    *,
    stats: MiningStats,
    min_code_chars: int,
    max_code_chars: int,
    min_query_words: int,
    max_query_chars: int,
    name_pairs: bool,
    docstring_rest: bool = False,
    keep_docstring: bool = False,
) -> list[_Candidate]:
    """The (query, code) candidates of one Python file; its functions and classes are counted in `stats`."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        stats.files_unparsable += 1
        return []
    lines = text.splitlines(keepends=True)
    out: list[_Candidate] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        stats.functions += 1
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        end = node.end_lineno or node.lineno
        seg = lines[start - 1 : end]
        if sum(len(x) for x in seg) > 4 * max_code_chars:  # cheap early cut (docstrings are removed below)
            stats.too_long += 1
            continue
        query, task = "", "doc"
        body = node.body
        has_doc = len(_body_without_docstring(node)) < len(body)
        if has_doc:
            d = body[0]
            first, last = d.lineno - 1, (d.end_lineno or d.lineno) - 1
            if (
                len(body) < 2
                or lines[first][: d.col_offset].strip()
                or lines[last][d.end_col_offset :].strip()
            ):
                stats.no_query += 1  # no code beyond the docstring, or a docstring sharing a line with code
                continue
            seg = lines[start - 1 : first] + lines[last + 1 : end]
            doc = ast.get_docstring(node, clean=True) or ""
            query = summarise_docstring(doc, max_query_chars)
            rest = doc.strip().split("\n\n", 1)[1].strip() if "\n\n" in doc.strip() else ""
            if keep_docstring:  # the whole docstring stays: for queries that do not repeat it verbatim
                seg = lines[start - 1 : end]
            elif docstring_rest and rest and '"""' not in rest and not rest.endswith("\\"):
                # keep the docstring without its first paragraph (the query): the code then looks like
                # documented code, as code to search usually is, yet does not contain the query
                pad = " " * d.col_offset
                rest_lines = rest.splitlines()
                kept = [f"{pad}{x}\n" if x.strip() else "\n" for x in rest_lines]
                kept[0] = f'{pad}"""{rest_lines[0]}\n'
                kept[-1] = kept[-1][:-1] + '"""\n'
                seg = lines[start - 1 : first] + kept + lines[last + 1 : end]
        else:
            query = _leading_comment(lines, start)[:max_query_chars]
        if not _usable_query(query, min_query_words):
            query, task = "", "name"
            if name_pairs and not (node.name.startswith("__") and node.name.endswith("__")):
                words = split_identifier(node.name)
                if len(words.split()) >= 2:
                    query = words
        if not query:
            stats.no_query += 1
            continue
        code = "".join(_cut_indent(x, node.col_offset) for x in seg).rstrip() + "\n"
        if len(code) < min_code_chars:
            stats.too_short += 1
            continue
        if len(code) > max_code_chars:
            stats.too_long += 1
            continue
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):
            stats.code_unparsable += 1
            continue
        raw = "".join(lines[node.lineno - 1 : end])
        keys = (*ast_keys(node), text_key(raw))
        qkey = hashlib.sha1(re.sub(r"[\W_]+", " ", query.lower()).strip().encode()).hexdigest()
        out.append(_Candidate(query, code, task, node.name, f"{source}:{node.lineno}", keys, qkey))  # type: ignore[arg-type]
    return out


def mine_pairs(
    roots: Iterable[str | Path] | None = None,
    *,
    exclude_corpus: str | Path | None = None,
    max_pairs: int = 4000,
    seed: int = 0,
    name_pairs: bool = True,
    name_pairs_share: float = 0.2,
    include_tests: bool = False,
    min_code_chars: int = 80,
    max_code_chars: int = 2000,
    min_query_words: int = 3,
    max_query_chars: int = 300,
    docstring_rest: bool = False,
    keep_docstring: bool = False,
    stats: MiningStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Pair]:
    """Mine (docstring/comment -> code) pairs, and (split name -> code) pairs at most `name_pairs_share`
    of `max_pairs`, from the Python files under `roots` (default: stdlib and site-packages).

    Files are visited in sorted order and the first occurrence of a function wins, so the candidate
    list is deterministic; `max_pairs` are then drawn with `seed`. `stats` (if given) is filled in.
    """
    t0 = time.perf_counter()
    stats = stats if stats is not None else MiningStats()
    if max_pairs < 1:
        raise InvalidInputError("max_pairs must be >= 1")
    if not 0.0 <= name_pairs_share <= 1.0:
        raise InvalidInputError("name_pairs_share must be in [0, 1]")
    excluded = load_exclusions(exclude_corpus, stats) if exclude_corpus else set()
    root_list = [Path(r) for r in roots] if roots is not None else default_roots()
    seen_code: set[str] = set()
    seen_query: set[str] = set()
    docs: list[_Candidate] = []
    names: list[_Candidate] = []
    for root in root_list:
        for path in iter_python_files(root, include_tests):
            stats.files += 1
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                stats.files_unparsable += 1
                continue
            for c in extract_candidates(
                text,
                str(path),
                stats=stats,
                min_code_chars=min_code_chars,
                max_code_chars=max_code_chars,
                min_query_words=min_query_words,
                max_query_chars=max_query_chars,
                name_pairs=name_pairs,
                docstring_rest=docstring_rest,
                keep_docstring=keep_docstring,
            ):
                if any(k in excluded for k in c.keys):
                    stats.excluded_cosqa += 1
                    continue
                if c.keys[0] in seen_code:
                    stats.duplicate_code += 1
                    continue
                if c.query_key in seen_query:
                    stats.duplicate_query += 1
                    continue
                seen_code.add(c.keys[0])
                seen_query.add(c.query_key)
                (docs if c.task == "doc" else names).append(c)
            if progress is not None:
                progress(1)
    stats.candidates_doc, stats.candidates_name = len(docs), len(names)
    rng = random.Random(seed)
    n_name = min(len(names), int(name_pairs_share * max_pairs)) if name_pairs else 0
    n_doc = min(len(docs), max_pairs - n_name)
    n_name = min(len(names), max_pairs - n_doc) if name_pairs else 0
    picked = [docs[i] for i in sorted(rng.sample(range(len(docs)), n_doc))]
    picked += [names[i] for i in sorted(rng.sample(range(len(names)), n_name))]
    rng.shuffle(picked)
    stats.pairs_doc, stats.pairs_name = n_doc, n_name
    stats.seconds = round(time.perf_counter() - t0, 1)
    return [Pair(c.query, c.code, c.task, c.name, c.source) for c in picked]


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class AdapterConfig:
    """`kvrag train code-adapter` options. The defaults train in about half an hour on 2 CPU cores."""

    out: Path
    base: str = "bundled:multilingual-e5-small"
    cosqa: Path | None = DEFAULT_COSQA
    roots: tuple[str, ...] = ()  # empty: stdlib + site-packages
    include_tests: bool = False
    # keep the docstring minus its first paragraph (the query) on the code side; False: no docstring
    docstring_rest: bool = True
    # keep the whole docstring on the code side, as CoSQA's functions have it (with --query-style
    # generated only: other query styles are the docstring's own first sentence)
    keep_docstring: bool = False
    # "web": docstring queries lower-cased, trailing punctuation dropped (as people type searches);
    # "search": also first sentence only, imperative verb, no articles or markup, and the language
    # named the way code searches name it ("python x", "x python", "how to x in python")
    # "generated": searches written by `query_writer` (an instruction-tuned LLM, few-shot, greedy) from
    # each docstring summary or split name; where it gives no usable search, the "search" rewrite
    query_style: Literal["docstring", "web", "search", "generated"] = "docstring"
    query_writer: str = DEFAULT_WRITER
    batching: Literal["random", "source"] = "random"  # source: batches of neighbouring files (harder)
    # one mined hard negative per pair: the training code the base model ranks highest for the query
    # below `hard_negative_margin` x the positive's score (higher ones are likely unlabelled positives)
    hard_negatives: bool = False
    hard_negative_margin: float = 0.95
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
    # the memory (what lets 32 pairs + 32 hard negatives of 256 tokens fit in 24 GB)
    gradient_checkpointing: bool = False
    # distillation: encoders (model specs) whose mean cosine scores over each batch's queries x codes
    # the student's scores should match (KL of the softmaxes, at every Matryoshka dim), on top of the
    # ranking loss. Their embeddings of the training pairs are computed once, before training.
    teachers: tuple[str, ...] = ()
    distill_weight: float = 1.0
    teacher_scale: float = 20.0  # softmax scale of the teachers' mean cosine
    extra: dict = field(default_factory=dict)


def web_query(text: str) -> str:
    """A docstring summary the way people type a search: lower-case, no trailing punctuation."""
    return text.strip().rstrip(".!:;").strip().lower()


_MARKUP = re.compile(r":[a-z]+:`~?([^`]*)`|``?([^`]*)``?")
_ARTICLES = {"a", "an", "the"}
_NOT_VERBS = {"this", "is", "was", "has", "does", "class", "process", "status", "alias", "bytes", "items"}


def _imperative(word: str) -> str:
    """`returns` -> `return`, `matches` -> `match`: docstrings describe, searches ask."""
    if word in ("return", "returns", "returned"):
        return "get"
    if word in _NOT_VERBS or len(word) < 5 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if word.endswith("ies"):
        return word[:-3] + "y"
    return word[:-1]


def search_query(text: str, rng: random.Random, language: str = "python", max_words: int = 10) -> str:
    """A docstring summary (or split name) rewritten the way people search for code: the first
    sentence, lower-case, markup and articles dropped, the leading verb in the imperative
    (`Returns the mean` -> `get mean`), at most `max_words` words, and the language named at the
    start, at the end, or as `how to ... in <language>` (drawn from `rng`)."""
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    first = _MARKUP.sub(lambda m: m.group(1) or m.group(2) or "", first)
    words = re.findall(r"[A-Za-z0-9_][A-Za-z0-9_'+#.-]*", first.lower())
    words = [w.rstrip(".-'") for w in words]
    words = [w for w in words if w and w not in _ARTICLES and w != language]
    if words[:2] in (["this", "function"], ["this", "method"], ["helper", "to"], ["function", "to"]):
        words = words[2:]
    if (
        len(words) > 2
        and words[0] in ("return", "returns")
        and words[1] == "true"
        and words[2] in ("if", "when")
    ):
        words = ["check", "if", *words[3:]]
    elif len(words) > 1 and words[0] in ("return", "returns") and words[1] == "whether":
        words = ["check", *words[1:]]
    words = words[:max_words]
    if words:
        words[0] = _imperative(words[0])
    q = " ".join(words) or text.strip().lower()
    draw = rng.random()
    if draw < 0.45:
        return f"{language} {q}".strip()
    if draw < 0.85:
        return f"{q} {language}".strip()
    return f"how to {q} in {language}"


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


def teacher_embeddings(specs: Sequence[str], pairs: Sequence[Pair], *, show_progress: bool = False):
    """Each teacher's normalised (query, code) embeddings of `pairs`, as float32 tensors. Encoders are
    built from the settings, embedding cache included: a second run on the same pairs encodes nothing."""
    import torch

    from kvrag.encoders.encoder import load_encoder
    from kvrag.service.settings import get_settings

    out = []
    for spec in specs:
        enc = load_encoder(get_settings().encoder_config(spec))
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


def mine_hard_negatives(
    model, tokenizer, pairs: Sequence[Pair], prompts: dict[str, str], cfg: AdapterConfig
) -> list[int]:
    """For each pair, the index of another pair whose code `model` scores highest for this pair's
    query while staying below `cfg.hard_negative_margin` x the score of the right code (-1: none).
    A code scoring close to or above the right one is more likely a second correct answer than a
    wrong one, so it is skipped (positive-aware mining)."""
    import torch

    if not 0.0 < cfg.hard_negative_margin <= 1.0:
        raise InvalidInputError("hard_negative_margin must be in (0, 1]")
    was_training = model.training
    model.eval()
    q = embed(model, tokenizer, [p.query for p in pairs], prompts["query"], cfg.query_max_length)
    c = embed(model, tokenizer, [p.code for p in pairs], prompts["passage"], cfg.code_max_length)
    model.train(was_training)
    out: list[int] = []
    for b in range(0, len(pairs), 512):
        sims = q[b : b + 512] @ c.T
        rows = torch.arange(sims.shape[0])
        pos = sims[rows, rows + b].clone()
        sims[rows, rows + b] = -2.0
        sims[sims >= cfg.hard_negative_margin * pos.unsqueeze(1)] = -2.0
        best, idx = sims.max(dim=1)
        out += [int(i) if float(v) > -2.0 else -1 for v, i in zip(best, idx, strict=True)]
    return out


def batch_codes(idx: Sequence[int], negatives: Sequence[int] | None) -> list[int]:
    """The codes a batch scores each query against: its own pairs' codes (row i's right answer is
    column i), then the rows' hard negatives that are not already there, each once."""
    codes = list(idx)
    if negatives is not None:
        seen = set(codes)
        for i in idx:
            n = negatives[i]
            if n >= 0 and n not in seen:
                seen.add(n)
                codes.append(n)
    return codes


def make_batches(
    pairs: Sequence[Pair], code_lengths: Sequence[int], cfg: AdapterConfig, rng: random.Random
) -> list[list[int]]:
    """One epoch's batches of pair indices, in random order. `random`: random pairs, drawn from
    windows of 8 batches sorted by code length (less padding). `source`: pairs sorted by source file
    and cut into batches, so a batch holds neighbours in the source tree: they share a package's
    vocabulary and idioms, which makes harder in-batch negatives than unrelated libraries."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    if cfg.batching == "source":
        order.sort(key=lambda i: pairs[i].source.rsplit(":", 1)[0])
        batches = [order[b : b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
    elif cfg.batching == "random":
        window = 8 * cfg.batch_size
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: code_lengths[i])
            batches += [chunk[b : b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]
    else:
        raise InvalidInputError(f"batching must be 'source' or 'random', not {cfg.batching!r}")
    rng.shuffle(batches)
    return batches


def fit(
    model,
    tokenizer,
    pairs: Sequence[Pair],
    cfg: AdapterConfig,
    prompts: dict[str, str],
    *,
    negatives: Sequence[int] | None = None,
    teachers=None,
    show_progress: bool = False,
) -> list[float]:
    """Train the LoRA parameters of `model` on `pairs`; returns the loss of each step. `negatives`
    (one pair index per pair, -1 for none; see `mine_hard_negatives`) adds each row's hard negative
    code to the batch's candidates. `teachers` (see `teacher_embeddings`) adds the distillation loss."""
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
        batches = make_batches(pairs, [len(r) for r in c_rows], cfg, rng)
        for idx in batches:
            if len(idx) < 2 or len(losses) >= total:
                continue  # one pair has no in-batch negative
            qi, qm = _pad(tokenizer, [q_rows[i] for i in idx])
            codes = batch_codes(idx, negatives)
            ci, cm = _pad(tokenizer, [c_rows[i] for i in codes])
            q = mean_pool(model, qi, qm)
            c = mean_pool(model, ci, cm)
            w = weights[idx]
            loss = matryoshka_mnrl_loss(q, c, dims, cfg.scale, None if bool((w == 1).all()) else w)
            if teachers:
                t = teacher_batch_scores(teachers, idx, codes)
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
    pairs: Sequence[Pair] | None = None,
    show_progress: bool = False,
    log: Callable[..., None] = print,
) -> dict:
    """Mine, train, measure and save the adapter; returns the report (also written to `recipe.json`).

    `pairs` skips mining (tests, or a fixed data set)."""
    import peft
    import torch
    from tqdm.auto import tqdm

    from kvrag.encoders.models import resolve_model
    from kvrag.service.settings import get_settings

    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise InvalidInputError("--epochs must be >= 1 and --batch-size >= 2")
    if cfg.rank < 1:
        raise InvalidInputError("--rank must be >= 1")
    if cfg.query_style not in ("docstring", "web", "search", "generated"):  # before minutes of mining
        raise InvalidInputError(
            f"query_style must be docstring, web, search or generated, not {cfg.query_style!r}"
        )
    if cfg.query_style == "generated":
        resolve_model(cfg.query_writer, get_settings().models_dir)
    elif cfg.keep_docstring:
        raise InvalidInputError(
            "--keep-docstring needs --query-style generated: the query is the docstring's own"
        )
    if cfg.keep_docstring and not cfg.docstring_rest:
        raise InvalidInputError("--keep-docstring and --drop-docstring contradict each other")
    if cfg.teachers and not cfg.distill_weight > 0:
        raise InvalidInputError("--distill-weight must be > 0 with --teacher")
    for spec in cfg.teachers:  # a bad spec fails here, not after minutes of mining
        resolve_model(spec, get_settings().models_dir)
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
                keep_docstring=cfg.keep_docstring,
                stats=stats,
                progress=bar.update,
            )
        log(f"mined {len(pairs)} pairs from {stats.files} files in {stats.seconds} s")
    pairs = list(pairs)
    n_written, write_s = 0, 0.0
    if cfg.query_style == "web":
        pairs = [replace(p, query=web_query(p.query)) if p.task == "doc" else p for p in pairs]
    elif cfg.query_style == "search":  # name pairs too: the language in a query must not tell the task
        rng = random.Random(cfg.seed + 3)
        pairs = [replace(p, query=search_query(p.query, rng)) for p in pairs]
    elif cfg.query_style == "generated":
        t0 = time.perf_counter()
        with tqdm(total=len(pairs), desc="writing queries", unit="pair", disable=not show_progress) as bar:
            written = write_queries(
                [p.query for p in pairs],
                writer=cfg.query_writer,
                cache_path=get_settings().root / "cache" / "written-queries.jsonl",
                progress=bar.update,
            )
        rng = random.Random(cfg.seed + 3)
        n_written = sum(bool(q) for q in written)
        write_s = time.perf_counter() - t0
        pairs = [
            replace(p, query=q or search_query(p.query, rng)) for p, q in zip(pairs, written, strict=True)
        ]
        log(f"wrote {n_written} of {len(pairs)} queries in {write_s:.0f} s")
    doc_idx = [i for i, p in enumerate(pairs) if p.task == "doc"]
    n_held = min(cfg.heldout, len(doc_idx) // 5)
    held_set = set(random.Random(cfg.seed + 2).sample(doc_idx, n_held)) if n_held >= 2 else set()
    held = [pairs[i] for i in sorted(held_set)]
    train = [p for i, p in enumerate(pairs) if i not in held_set]
    if len(train) < 2:
        raise InvalidInputError("fewer than 2 training pairs: widen the roots or raise --max-pairs")

    torch.manual_seed(cfg.seed)
    base_path = resolve_model(cfg.base, get_settings().models_dir)
    model, tokenizer = load_base(base_path, attention_dropout=cfg.attention_dropout)
    prompts = read_prompts(base_path)
    model = add_lora(model, cfg)
    t0 = time.perf_counter()
    with model.disable_adapter():
        before = evaluate(model, tokenizer, held, prompts, cfg) if held else {}
        eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        negatives = mine_hard_negatives(model, tokenizer, train, prompts, cfg) if cfg.hard_negatives else None
        mine_negatives_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teachers = teacher_embeddings(cfg.teachers, train, show_progress=show_progress) if cfg.teachers else None
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = fit(
        model,
        tokenizer,
        train,
        cfg,
        prompts,
        negatives=negatives,
        teachers=teachers,
        show_progress=show_progress,
    )
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
            "hard_negatives": sum(n >= 0 for n in negatives) if negatives is not None else 0,
            "queries_written": n_written,
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
            "writing_queries": round(write_s, 1),
            "eval_base": round(eval_s, 1),
            "hard_negatives": round(mine_negatives_s, 1),
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

Made by `{report.get("command", "kvrag train code-adapter")}` in {report["seconds"]["total"]:.0f} s
({report["threads"]} CPU thread(s), torch {report["torch"]}, peft {report["peft"]}): {report["pairs"]["train"]}
(docstring or comment -> code) and (split name -> code) pairs mined from {report["mining"]["files"]} Python files
of the standard library and installed packages, CoSQA's functions left out ({report["mining"]["excluded_cosqa"]}
excluded), {report["steps"]} steps of in-batch-negative ranking loss{distilled} (loss {report["loss_first"]} -> {report["loss_final"]}).
Every option and count is in `recipe.json`.

{table}
"""


# ---------------------------------------------------------------------------------------------------
# The bundled model


def adapter_digest(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((Path(adapter_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def _check_adapter(adapter_dir: Path) -> None:
    missing = [
        n
        for n in ("adapter_config.json", "adapter_model.safetensors")
        if not (Path(adapter_dir) / n).is_file()
    ]
    if missing:
        raise ModelNotFoundError(
            f"{adapter_dir}: the code adapter is missing ({', '.join(missing)}): train it with "
            f"`kvrag train code-adapter --out encoders/adapters/{NAME}`"
        )


def build_merged_folder(dest: Path, base_folder: Path, adapter_dir: Path) -> Path:
    """Write `dest`: the encoder at `base_folder` with the LoRA adapter merged into its weights, plus
    the base's tokenizer and sentence-transformers files, so it loads like any encoder folder."""
    from peft import PeftModel
    from transformers import AutoModel

    _check_adapter(adapter_dir)
    base_folder, dest = Path(base_folder), Path(dest)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_folder)), str(adapter_dir))
    merged = model.merge_and_unload()
    with staged_folder(dest) as tmp:
        for p in base_folder.iterdir():  # tokenizer, pooling and prompt files, not the weights
            if (
                p.name.startswith((".", "kvrag"))
                or p.suffix in (".safetensors", ".bin")
                or p.name == "config.json"
            ):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        merged.save_pretrained(str(tmp))
        (tmp / "kvrag-adapter.json").write_text(
            json.dumps({"adapter_sha256_16": adapter_digest(adapter_dir), "base": str(base_folder)}),
            encoding="utf-8",
        )
    return dest


def _merged_folder(folder: Path, base_folder: Path, adapter_dir: Path) -> Path:
    """`folder` holding base + adapter merged: reused while it matches the adapter, else rebuilt."""
    _check_adapter(adapter_dir)
    if marker_matches(folder / "kvrag-adapter.json", "adapter_sha256_16", adapter_digest(adapter_dir)):
        return folder
    return build_merged_folder(folder, Path(base_folder), adapter_dir)


def code_encoder_folder(models_dir: Path, base_folder: Path, adapter_dir: Path = ADAPTER_DIR) -> Path:
    """The prepared `bundled:code-e5-small` folder (built on first use, rebuilt when the adapter changed)."""
    return _merged_folder(Path(models_dir) / NAME, base_folder, adapter_dir)


def adapter_encoder_folder(adapter_dir: Path, models_dir: Path) -> Path:
    """An adapter folder (`kvrag train code-adapter --out DIR`) used as an encoder spec: the base
    model its `adapter_config.json` names, with the adapter merged in, prepared once under
    `models_dir/adapters/` (so a freshly trained adapter is evaluated with `--encoder DIR`)."""
    from kvrag.encoders.models import resolve_model

    adapter_dir = Path(adapter_dir)
    base_spec = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path"
    )
    if not base_spec:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json names no base model")
    base_folder = Path(resolve_model(base_spec, models_dir))
    return _merged_folder(
        Path(models_dir) / "adapters" / adapter_digest(adapter_dir), base_folder, adapter_dir
    )
