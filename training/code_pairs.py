"""(query, code) pairs mined from Python sources for the code adapter (`training.code_adapter`).

The query is the first paragraph (or sentence) of a function's or class's docstring, or the comment
block just above it; the code is its source with decorators, signature and body, and the docstring
without that first paragraph (or, with `docstring_rest=False`, without any docstring). A second,
weaker task pairs a function's name split into words (`read_csv_file` -> "read csv file") with its
code. Pairs are deduplicated on a normalised code hash (docstrings, comments and layout ignored) and
on a normalised query, and every function that also appears in the CoSQA corpus (same normalised
code, or same name and body) is left out, so that evaluating on CoSQA stays clean.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvrag.errors import InvalidInputError

Task = Literal["doc", "name"]

# Comment blocks that say nothing about what the code does.
_NOISE_COMMENT = re.compile(
    r"^(copied from|type:|noqa|pragma|pylint|fmt:|mypy|isort|flake8|ruff|-\*-|!|copyright|licen[cs]ed?|spdx)",
    re.IGNORECASE,
)
_TRIPLE_STRING = re.compile(r"[rRbBuU]{0,2}(\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?''')")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_TEST_DIRS = {"test", "tests", "testing", "idle_test", "unittests"}


def split_identifier(name: str) -> str:
    """`read_csv_file` / `ReadCSVFile` / `readCsv2` -> "read csv file" / "read csv file" / "read csv 2"."""
    return " ".join(w.lower() for w in _WORD.findall(name))


def summarise_docstring(doc: str, max_chars: int = 300) -> str:
    """The first paragraph of a (cleaned) docstring on one line; its first sentence when that is too long."""
    para = _SPACE.sub(" ", doc.strip().split("\n\n", 1)[0]).strip()
    if len(para) > max_chars:
        m = re.match(r"(.+?[.!?])(\s|$)", para)
        para = m.group(1) if m and len(m.group(1)) <= max_chars else para[:max_chars].rsplit(" ", 1)[0]
    return para


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
            if docstring_rest and rest and '"""' not in rest and not rest.endswith("\\"):
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
