"""Small text helpers for source code: telling code from prose (pseudo-query calibration)."""

from __future__ import annotations

import re

# a Python `def name(` or `class Name(` / `class Name:` at the start of a line
_DEF = re.compile(r"^[ \t]*(?:(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(|class[ \t]+\w+[ \t]*[(:])", re.MULTILINE)


def defines_code(text: str) -> bool:
    """Whether `text` holds a Python function or class definition (whole files and fragments alike:
    no parsing)."""
    return _DEF.search(text) is not None
