"""Split documents into passages for a retrieval index.

Every chunk keeps exact character offsets into its document (``chunk.text == document[start:end]``)
so that answers can cite the source precisely. Whitespace is trimmed by moving offsets, never by
editing text. Prose is packed sentence by sentence (multilingual sentence splitting) with a token
overlap between neighbours; Python source is cut along ``ast`` definitions so that each passage is
a self-contained function, class or method; other code falls back to overlapping line windows.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

TokenCounter = Callable[[Sequence[str]], list[int]]  # token count of each string (no special tokens)


@dataclass(frozen=True)
class Chunk:
    text: str  # exactly document[start:end]
    start: int  # character offset in the document
    end: int
    kind: Literal["text", "code"]
    title: str | None = None  # for code: "class Foo" / "def foo" / "Foo.bar" / "module"; None for prose


_Span = tuple[int, int]
_Piece = tuple[int, int, int]  # (start, end, token count)

_CLOSERS = "\"'”’»)]」』）"
_CLOSE = f"[{re.escape(_CLOSERS)}]*"
_BREAK = re.compile(
    rf"(?P<cjk>[。！？]+{_CLOSE})"  # CJK terminators need no following space
    rf"|(?P<end>[.!?…।॥؟۔]+{_CLOSE})(?=\s|$)"
    r"|(?P<para>\n\s*\n)"  # blank line = paragraph break
)
_ABBREVIATIONS = frozenset(
    ["e.g", "i.e", "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "fig", "approx"]
    + ["ca", "nr", "inc", "ltd", "z.b", "d.h", "u.a", "bzw"]
)
_WORD = re.compile(r"\S+")
_NEXT_CHAR = re.compile(r"\s*(\S)")
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_DEFS = (*_FUNCS, ast.ClassDef)


def _strip(text: str, start: int, end: int) -> _Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _check_tokens(max_tokens: int, overlap_tokens: int) -> None:
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens={max_tokens}), got {overlap_tokens}")


def _is_false_stop(text: str, seg_start: int, match: re.Match[str]) -> bool:
    """True when a '.'/'…' run is an abbreviation, an initial, or followed by a lowercase word."""
    punct = match.group("end").rstrip(_CLOSERS)
    if not set(punct) <= {".", "…"}:
        return False
    nxt = _NEXT_CHAR.match(text, match.end())
    if nxt and nxt.group(1).islower():
        return True
    i = match.start()
    while i > seg_start and not text[i - 1].isspace():
        i -= 1
    word = text[i : match.start()].lstrip(_CLOSERS + "([¿¡")
    return punct == "." and (word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Return (start, end) spans of the sentences in ``text``, whitespace excluded.

    Sentences end at Latin, CJK, Devanagari and Arabic terminators and at blank lines; common
    abbreviations ("e.g.", "Dr."), initials and decimals do not end a sentence. Spans rather than
    strings are returned so that callers can keep exact document offsets.
    """
    spans: list[_Span] = []
    seg_start = 0
    for m in _BREAK.finditer(text):
        if m.group("end") and _is_false_stop(text, seg_start, m):
            continue
        span = _strip(text, seg_start, m.start() if m.group("para") else m.end())
        if span[0] < span[1]:
            spans.append(span)
        seg_start = m.end()
    span = _strip(text, seg_start, len(text))
    if span[0] < span[1]:
        spans.append(span)
    return spans


def _split_long(text: str, start: int, end: int, count_tokens: TokenCounter, max_tokens: int) -> list[_Piece]:
    """Cut text[start:end] at word boundaries (characters for unspaced text) into pieces <= max_tokens."""
    units = [m.span() for m in _WORD.finditer(text, start, end)]
    pieces: list[_Piece] = []
    i = 0
    while i < len(units):
        seen: dict[int, int] = {}

        def cost(n: int, i: int = i, seen: dict[int, int] = seen) -> int:
            if n not in seen:
                seen[n] = count_tokens([text[units[i][0] : units[i + n - 1][1]]])[0]
            return seen[n]

        left = len(units) - i
        good, bad = 0, 1  # gallop to bracket the largest fitting unit count, then bisect
        while bad <= left and cost(bad) <= max_tokens:
            good, bad = bad, bad * 2
        bad = min(bad, left + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if cost(mid) <= max_tokens else (good, mid)
        if good == 0:
            u_start, u_end = units[i]
            if u_end - u_start > 1:  # one unspaced "word" is too long: fall back to characters
                units[i : i + 1] = [(k, k + 1) for k in range(u_start, u_end)]
                continue
            good = 1  # a single character over budget: take it anyway to guarantee progress
        pieces.append((units[i][0], units[i + good - 1][1], cost(good)))
        i += good
    return pieces


def _measure(text: str, spans: list[_Span], count_tokens: TokenCounter, max_tokens: int) -> list[_Piece]:
    """Count all spans in one batched call; split spans that exceed max_tokens."""
    counts = count_tokens([text[s:e] for s, e in spans]) if spans else []
    pieces: list[_Piece] = []
    for (s, e), n in zip(spans, counts, strict=True):
        pieces.extend([(s, e, n)] if n <= max_tokens else _split_long(text, s, e, count_tokens, max_tokens))
    return pieces


def _pack(pieces: list[_Piece], max_tokens: int, overlap_tokens: int) -> list[_Span]:
    """Greedily pack pieces into spans of summed count <= max_tokens, carrying an overlap tail."""
    out: list[_Span] = []
    cur: list[_Piece] = []
    total = 0
    for piece in pieces:
        if cur and total + piece[2] > max_tokens:
            out.append((cur[0][0], cur[-1][1]))
            keep: list[_Piece] = []
            kept = 0
            for prev in reversed(cur[1:]):  # never carry the whole chunk, so every chunk adds new text
                if kept + prev[2] > overlap_tokens:
                    break
                keep.insert(0, prev)
                kept += prev[2]
            while keep and kept + piece[2] > max_tokens:
                kept -= keep.pop(0)[2]
            cur, total = keep, kept
        cur.append(piece)
        total += piece[2]
    if cur:
        out.append((cur[0][0], cur[-1][1]))
    return out


def chunk_prose(
    text: str, count_tokens: TokenCounter, *, max_tokens: int = 256, overlap_tokens: int = 32
) -> list[Chunk]:
    """Pack whole sentences into chunks of at most ``max_tokens`` tokens with sentence overlap.

    Sentence-aligned chunks embed and read better than arbitrary cuts; the overlap keeps context
    that straddles a boundary retrievable from either side. Overlong sentences are cut at words
    (or characters for unspaced scripts). Token counts are summed per sentence (one batched call).
    """
    _check_tokens(max_tokens, overlap_tokens)
    pieces = _measure(text, split_sentences(text), count_tokens, max_tokens)
    return [Chunk(text[s:e], s, e, "text") for s, e in _pack(pieces, max_tokens, overlap_tokens)]


def _line_starts(text: str) -> list[int]:
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    if len(starts) > 1 and starts[-1] == len(text):
        starts.pop()
    return starts


def chunk_lines(text: str, *, max_lines: int = 40, overlap_lines: int = 8) -> list[Chunk]:
    """Cut ``text`` into windows of ``max_lines`` lines overlapping by ``overlap_lines``.

    A language-agnostic fallback for code (or unparsable Python): line windows keep code layout
    intact, and the overlap keeps statements near a window edge retrievable in full.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    if not 0 <= overlap_lines < max_lines:
        raise ValueError(f"overlap_lines must be in [0, max_lines={max_lines}), got {overlap_lines}")
    starts = _line_starts(text)
    chunks: list[Chunk] = []
    for first in range(0, len(starts), max_lines - overlap_lines):
        last = first + max_lines
        s, e = _strip(text, starts[first], starts[last] if last < len(starts) else len(text))
        if s < e:
            chunks.append(Chunk(text[s:e], s, e, "code"))
        if last >= len(starts):
            break
    return chunks


def chunk_python(source: str, count_tokens: TokenCounter, *, max_tokens: int = 384) -> list[Chunk]:
    """Chunk Python source along top-level functions and classes (decorators and docstrings kept).

    Whole definitions are the units people search for and cite. Classes over ``max_tokens`` are
    split into a "class Name" header and one "Name.method" chunk per method; module-level code is
    grouped into "module" chunks; overlong definitions are cut into line windows. Source that does
    not parse falls back to :func:`chunk_lines`.
    """
    _check_tokens(max_tokens, 0)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return chunk_lines(source)
    starts = _line_starts(source)
    chunks: list[Chunk] = []

    def span(lo: int, hi: int) -> _Span:  # 1-based inclusive line range -> stripped char span
        return _strip(source, starts[lo - 1], starts[hi] if hi < len(starts) else len(source))

    def fits(lo: int, hi: int) -> bool:
        s, e = span(lo, hi)
        return count_tokens([source[s:e]])[0] <= max_tokens

    def emit(lo: int, hi: int, title: str, overlap: int) -> None:
        s, e = span(lo, hi)
        if s >= e:
            return
        if fits(lo, hi):
            chunks.append(Chunk(source[s:e], s, e, "code", title))
            return
        lines = [sp for n in range(lo, hi + 1) if (sp := span(n, n))[0] < sp[1]]
        for s, e in _pack(_measure(source, lines, count_tokens, max_tokens), max_tokens, overlap):
            chunks.append(Chunk(source[s:e], s, e, "code", title))

    def first_line(node: ast.stmt) -> int:
        return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])

    def walk(nodes: list[ast.stmt], lo: int, hi: int, kinds: tuple[type, ...], gap: str, prefix: str) -> None:
        for node in nodes:
            if not isinstance(node, kinds):
                continue
            first, last = first_line(node), node.end_lineno or node.lineno
            if first > lo:
                emit(lo, first - 1, gap, 0)
            is_class = isinstance(node, ast.ClassDef)
            methods = [n for n in node.body if isinstance(n, _FUNCS)] if is_class else []
            if methods and not fits(first, last):
                header = f"class {node.name}"
                emit(first, first_line(methods[0]) - 1, header, 0)
                walk(node.body, first_line(methods[0]), last, _FUNCS, header, f"{node.name}.")
            else:
                emit(first, last, (prefix or ("class " if is_class else "def ")) + node.name, max_tokens // 8)
            lo = last + 1
        if lo <= hi:
            emit(lo, hi, gap, 0)

    walk(tree.body, 1, len(starts), _DEFS, "module", "")
    return chunks


def chunk_document(
    text: str,
    *,
    kind: Literal["text", "python", "code"],
    count_tokens: TokenCounter,
    max_tokens: int = 256,
    overlap_tokens: int = 32,
) -> list[Chunk]:
    """Chunk one document with the strategy for its ``kind`` (single entry point for indexing)."""
    _check_tokens(max_tokens, overlap_tokens)
    if kind == "text":
        return chunk_prose(text, count_tokens, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
    if kind == "python":
        return chunk_python(text, count_tokens, max_tokens=max_tokens)
    if kind == "code":
        return chunk_lines(text)
    raise ValueError(f"unknown document kind {kind!r}; expected 'text', 'python' or 'code'")
