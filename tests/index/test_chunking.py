"""Tests for index.chunking (no models: a whitespace/CJK-character fake token counter)."""

from __future__ import annotations

import pytest

from kvrag.index.chunking import (
    Chunk,
    chunk_document,
    chunk_lines,
    chunk_prose,
    chunk_python,
    split_sentences,
)


def count(texts):
    return [len(t.split()) + sum(1 for c in t if "\u4e00" <= c <= "\u9fff") for t in texts]


def check_offsets(doc: str, chunks: list[Chunk]) -> None:
    assert chunks, "expected at least one chunk"
    for c in chunks:
        assert c.text == doc[c.start : c.end]
        assert c.text and c.text == c.text.strip()


def sentences(text: str) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text)]


# --- split_sentences -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. How are you? I am fine!", ["Hello world.", "How are you?", "I am fine!"]),
        (
            "Das ist gut. Wie geht es dir? Es kostet z.B. 3,50 Euro.",
            ["Das ist gut.", "Wie geht es dir?", "Es kostet z.B. 3,50 Euro."],
        ),
        ("今天天气很好。我们去公园吧！你来吗？", ["今天天气很好。", "我们去公园吧！", "你来吗？"]),
        (
            "यह पहला वाक्य है। यह दूसरा वाक्य है। क्या यह तीसरा है?",
            ["यह पहला वाक्य है।", "यह दूसरा वाक्य है।", "क्या यह तीसरा है?"],
        ),
        ("كيف حالك؟ أنا بخير۔", ["كيف حالك؟", "أنا بخير۔"]),
        ("Wait… Really? Yes.", ["Wait…", "Really?", "Yes."]),
        ('He said "Hi!" Then left.', ['He said "Hi!"', "Then left."]),
        ("Heading without stop\n\n  Body text here", ["Heading without stop", "Body text here"]),
        ("a; b; c.", ["a; b; c."]),
    ],
)
def test_split_sentences_multilingual(text, expected):
    assert sentences(text) == expected


def test_split_sentences_keeps_abbreviations_and_decimals():
    text = "Dr. Smith uses tools, e.g. hammers, i.e. heavy ones. Pi is 3.14 today. Mr. J. Jones agrees."
    assert sentences(text) == [
        "Dr. Smith uses tools, e.g. hammers, i.e. heavy ones.",
        "Pi is 3.14 today.",
        "Mr. J. Jones agrees.",
    ]


def test_split_sentences_spans_exclude_whitespace():
    text = "  One.   Two.  \n"
    assert split_sentences(text) == [(2, 6), (9, 13)]
    assert split_sentences("") == []
    assert split_sentences(" \n\n\t ") == []


# --- chunk_prose ------------------------------------------------------------------------------


def test_prose_packs_sentences_with_overlap():
    text = " ".join(f"Item {i} is quite nice." for i in range(30))  # 5 tokens per sentence
    spans = split_sentences(text)
    chunks = chunk_prose(text, count, max_tokens=20, overlap_tokens=6)
    check_offsets(text, chunks)
    assert all(c.kind == "text" and c.title is None for c in chunks)
    assert all(count([c.text])[0] <= 20 for c in chunks)
    starts, ends = {s for s, _ in spans}, {e for _, e in spans}
    assert all(c.start in starts and c.end in ends for c in chunks)
    # 4 sentences per chunk, last sentence carried over: chunk k starts at sentence 3k.
    assert chunks[0].text == " ".join(f"Item {i} is quite nice." for i in range(4))
    assert [c.start for c in chunks[:3]] == [spans[0][0], spans[3][0], spans[6][0]]
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        assert nxt.start < prev.end  # overlap
        assert nxt.start > prev.start and nxt.end > prev.end  # progress
    assert chunks[0].start == 0 and chunks[-1].end == len(text)


def test_prose_zero_overlap_and_big_overlap_still_progress():
    text = " ".join(f"Item {i} is quite nice." for i in range(12))
    no_overlap = chunk_prose(text, count, max_tokens=10, overlap_tokens=0)
    assert [c.text.count("Item") for c in no_overlap] == [2] * 6
    assert all(b.start > a.end for a, b in zip(no_overlap, no_overlap[1:], strict=False))
    # overlap budget covers a whole chunk: only a tail is carried, never the whole chunk.
    big = chunk_prose(text, count, max_tokens=10, overlap_tokens=9)
    check_offsets(text, big)
    assert all(b.start > a.start and b.end > a.end for a, b in zip(big, big[1:], strict=False))
    assert big[-1].end == len(text)


@pytest.mark.parametrize(
    "text",
    [
        "Der Hund schläft im Garten. Die Katze spielt mit dem Ball! Wo ist der Vogel? Er singt laut.",
        "今天天气很好。我们去公园吧！你来吗？明天会下雨。",
        "यह पहला वाक्य है। यह दूसरा वाक्य है। क्या यह तीसरा है? यह चौथा है।",
    ],
)
def test_prose_multilingual_chunks_end_at_sentences(text):
    chunks = chunk_prose(text, count, max_tokens=12, overlap_tokens=0)
    check_offsets(text, chunks)
    ends = {e for _, e in split_sentences(text)}
    assert len(chunks) >= 2
    assert all(c.end in ends for c in chunks)
    assert all(count([c.text])[0] <= 12 for c in chunks)


def test_prose_splits_huge_sentence_at_words():
    text = " ".join(f"w{i}" for i in range(100))
    chunks = chunk_prose(text, count, max_tokens=16, overlap_tokens=0)
    check_offsets(text, chunks)
    assert [count([c.text])[0] for c in chunks] == [16] * 6 + [4]
    assert " ".join(c.text for c in chunks) == text


def test_prose_splits_unspaced_chinese_at_characters():
    text = "我" * 50  # one "word" of 50 CJK characters, cost 51 with the fake counter
    chunks = chunk_prose(text, count, max_tokens=10, overlap_tokens=0)
    check_offsets(text, chunks)
    assert [len(c.text) for c in chunks] == [9] * 5 + [5]
    assert all(count([c.text])[0] <= 10 for c in chunks)
    assert "".join(c.text for c in chunks) == text


def test_prose_counts_sentences_in_one_batched_call():
    calls = []

    def counting(texts):
        calls.append(list(texts))
        return count(texts)

    text = " ".join(f"Item {i} is quite nice." for i in range(10))
    chunk_prose(text, counting, max_tokens=12, overlap_tokens=2)
    assert len(calls) == 1 and len(calls[0]) == 10


def test_prose_empty():
    assert chunk_prose("", count) == []
    assert chunk_prose("  \n\n ", count) == []


# --- chunk_python -----------------------------------------------------------------------------

SOURCE = '''"""Module docstring."""

import os

LIMIT = 3


@cache
@other(
    1,
)
def foo(x):
    """Foo docstring."""
    return x


async def fetch():
    return await os.stat(".")


class Small:
    """Small class."""

    def a(self):
        return 1


if __name__ == "__main__":
    foo(LIMIT)
'''


def test_python_definitions_become_chunks():
    chunks = chunk_python(SOURCE, count, max_tokens=384)
    check_offsets(SOURCE, chunks)
    assert all(c.kind == "code" for c in chunks)
    assert [c.title for c in chunks] == ["module", "def foo", "def fetch", "class Small", "module"]
    assert chunks[0].text == '"""Module docstring."""\n\nimport os\n\nLIMIT = 3'
    foo = chunks[1]
    assert foo.text.startswith("@cache\n@other(") and '"""Foo docstring."""' in foo.text
    assert foo.text.endswith("return x")
    assert chunks[2].text.startswith("async def fetch():")
    assert '"""Small class."""' in chunks[3].text and chunks[3].text.endswith("return 1")
    assert chunks[4].text == 'if __name__ == "__main__":\n    foo(LIMIT)'


BIG_CLASS = '''import math


class Big:
    """A big class with a long docstring that costs tokens."""

    scale = 2

    def a(self):
        return math.pi * self.scale * 1 * 2 * 3

    @property
    def b(self):
        return math.e * self.scale * 4 * 5 * 6

    async def c(self):
        return self.scale * 7 * 8 * 9 * 10
'''


def test_python_big_class_split_into_methods():
    chunks = chunk_python(BIG_CLASS, count, max_tokens=30)
    check_offsets(BIG_CLASS, chunks)
    assert [c.title for c in chunks] == ["module", "class Big", "Big.a", "Big.b", "Big.c"]
    header = chunks[1].text
    assert header.startswith("class Big:") and '"""A big class' in header and header.endswith("scale = 2")
    assert chunks[3].text.startswith("@property\n    def b(self):")
    assert chunks[4].text.startswith("async def c(self):")
    # With a generous budget the class stays whole.
    whole = chunk_python(BIG_CLASS, count, max_tokens=384)
    assert [c.title for c in whole] == ["module", "class Big"]


def test_python_long_function_split_into_windows():
    body = "\n".join(f"    x{i} = compute(x{i - 1}, {i})" for i in range(1, 40))
    source = f"def long(x0):\n{body}\n    return x39\n"
    chunks = chunk_python(source, count, max_tokens=40)
    check_offsets(source, chunks)
    assert len(chunks) > 3
    assert {c.title for c in chunks} == {"def long"}
    assert all(count([c.text])[0] <= 40 for c in chunks)
    assert chunks[0].text.startswith("def long(x0):") and chunks[-1].text.endswith("return x39")
    assert all(b.start > a.start and b.end > a.end for a, b in zip(chunks, chunks[1:], strict=False))


def test_python_syntax_error_falls_back_to_lines():
    source = "def broken(:\n" + "\n".join(f"    line {i}" for i in range(60)) + "\n"
    chunks = chunk_python(source, count)
    check_offsets(source, chunks)
    assert chunks == chunk_lines(source)
    assert all(c.title is None and c.kind == "code" for c in chunks)
    assert len(chunks) == 2


def test_python_empty():
    assert chunk_python("", count) == []
    assert chunk_python("\n   \n", count) == []


# --- chunk_lines ------------------------------------------------------------------------------


def test_lines_windows_and_overlap():
    text = "\n".join(f"line {i}" for i in range(100)) + "\n"
    chunks = chunk_lines(text, max_lines=40, overlap_lines=8)
    check_offsets(text, chunks)
    assert len(chunks) == 3
    assert [c.text.splitlines()[0] for c in chunks] == ["line 0", "line 32", "line 64"]
    assert [c.text.splitlines()[-1] for c in chunks] == ["line 39", "line 71", "line 99"]
    assert all(c.kind == "code" and c.title is None for c in chunks)


def test_lines_skip_blank_windows():
    text = "a\n" + "\n" * 10 + "b\n"
    chunks = chunk_lines(text, max_lines=5, overlap_lines=0)
    check_offsets(text, chunks)
    assert [c.text for c in chunks] == ["a", "b"]
    assert chunk_lines("") == [] and chunk_lines(" \n \n") == []


# --- chunk_document and validation ------------------------------------------------------------


def test_document_dispatch():
    prose = chunk_document("One two. Three four.", kind="text", count_tokens=count)
    assert [(c.text, c.kind) for c in prose] == [("One two. Three four.", "text")]
    py = chunk_document(SOURCE, kind="python", count_tokens=count)
    assert py == chunk_python(SOURCE, count, max_tokens=256)
    code = chunk_document("int main() {\n  return 0;\n}\n", kind="code", count_tokens=count)
    assert [(c.text, c.title) for c in code] == [("int main() {\n  return 0;\n}", None)]
    with pytest.raises(ValueError, match="kind"):
        chunk_document("x", kind="markdown", count_tokens=count)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: chunk_prose("x.", count, max_tokens=7), "max_tokens"),
        (lambda: chunk_prose("x.", count, max_tokens=16, overlap_tokens=-1), "overlap_tokens"),
        (lambda: chunk_prose("x.", count, max_tokens=16, overlap_tokens=16), "overlap_tokens"),
        (lambda: chunk_python("x = 1", count, max_tokens=4), "max_tokens"),
        (lambda: chunk_lines("x", max_lines=0), "max_lines"),
        (lambda: chunk_lines("x", max_lines=4, overlap_lines=4), "overlap_lines"),
        (lambda: chunk_document("x", kind="text", count_tokens=count, max_tokens=2), "max_tokens"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
