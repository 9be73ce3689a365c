"""Small text helpers for source code: identifier splitting, docstring summaries (the code-adapter
miner), and telling code from prose (pseudo-query calibration)."""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# a Python `def name(` or `class Name(` / `class Name:` at the start of a line
_DEF = re.compile(r"^[ \t]*(?:(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(|class[ \t]+\w+[ \t]*[(:])", re.MULTILINE)


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


def defines_code(text: str) -> bool:
    """Whether `text` holds a Python function or class definition (whole files and fragments alike:
    no parsing)."""
    return _DEF.search(text) is not None
