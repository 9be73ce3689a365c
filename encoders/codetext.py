"""Small text helpers for source code: identifier splitting, docstring summaries, and a query-like
line for a code passage (used by the code-adapter miner and by pseudo-query calibration)."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# the first Python `def` / `class` at the start of a line, and what follows its header
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_HEADER_END = re.compile(r":[ \t]*(?:#[^\n]*)?\n")
_DOCSTRING = re.compile(r"\s*[rRuU]{0,2}(\"\"\"|''')(.*?)\1", re.DOTALL)
_ONE_LINE_DOC = re.compile(r"\s*[rRuU]{0,2}(\"|')((?:\\.|(?!\1).)*)\1")


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


def code_query(text: str, max_chars: int = 200) -> str:
    """What someone searching for the first function or class in `text` might type: the summary of
    its docstring, else its name split into words (when that makes at least two words). Empty when
    `text` defines nothing. Works on fragments (chunks of a file) as well as whole files: no parsing."""
    m = _DEF.search(text)
    if m is None:
        return ""
    rest = text[m.end() :]
    head = _HEADER_END.search(rest)
    if head is not None and head.start() < 2000:  # the signature may span lines
        after = rest[head.end() :]
        doc = _DOCSTRING.match(after) or _ONE_LINE_DOC.match(after)
        if doc is not None:
            summary = summarise_docstring(doc.group(2), max_chars)
            if re.search(r"[A-Za-z]{2,}.*\s.*[A-Za-z]{2,}", summary):  # at least two words
                return summary
    words = split_identifier(m.group(1))
    return words if len(words.split()) >= 2 else ""
