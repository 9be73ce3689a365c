"""The code-pair miner (`training.code_pairs`) on a small source tree."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from training.code_pairs import MiningStats, mine_pairs, split_identifier, summarise_docstring

MODULE_A = '''
import functools


def parse_header_line(line, sep=":"):
    """Split an HTTP header line into its name and value.

    The name is lower-cased; surrounding whitespace is stripped.
    """
    name, _, value = line.partition(sep)
    return name.strip().lower(), value.strip()


class RingBuffer:
    """A fixed-size buffer that overwrites its oldest items when full."""

    def __init__(self, size):
        self.items = [None] * size
        self.start = 0

    @functools.lru_cache(maxsize=None)
    def oldest_item_index(self):
        """Return the position of the oldest element in the ring."""
        return self.start % len(self.items)


# Compute the running mean of a list of numbers, skipping missing values.
def running_mean(values):
    total, count, out = 0.0, 0, []
    for v in values:
        if v is not None:
            total += v
            count += 1
        out.append(total / max(count, 1))
    return out


def merge_sorted_lists(left, right):
    result = []
    while left and right:
        result.append(left.pop(0) if left[0] <= right[0] else right.pop(0))
    return result + left + right
'''

# The same first function with other layout, comments and docstring: a duplicate.
MODULE_B = '''
def parse_header_line(line, sep=':'):
    # comment that changes nothing
    """Another docstring for the same code, long enough to count."""
    name, _, value = line.partition(sep)

    return name.strip().lower(), value.strip()
'''

COSQA_FUNCTION = (
    "def running_mean(values):\n"
    '        """Running average."""\n'
    "        total, count, out = 0.0, 0, []\n"
    "        for v in values:\n"
    "            if v is not None:\n"
    "                total += v\n"
    "                count +=  1\n"
    "            out.append(total / max(count, 1))\n"
    "        return out"
)


@pytest.fixture
def source_tree(tmp_path) -> Path:
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text(MODULE_A)
    (root / "pkg" / "b.py").write_text(MODULE_B)
    (root / "pkg" / "broken.py").write_text("def oops(:\n    pass\n")
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "tests" / "test_x.py").write_text(
        'def test_it():\n    """Checks a thing works well."""\n    assert 1\n'
    )
    return root


def _mine(root, **kw):
    stats = MiningStats()
    kw = {"max_pairs": 100, "seed": 0, "min_code_chars": 20, **kw}
    return mine_pairs([root], stats=stats, **kw), stats


def test_split_identifier_and_docstring_summary():
    assert split_identifier("read_csv_file") == "read csv file"
    assert split_identifier("ReadCSVFile") == "read csv file"
    assert split_identifier("_getHTTPResponse2") == "get http response 2"
    assert (
        summarise_docstring("First line\ncontinues here.\n\nSecond paragraph.")
        == "First line continues here."
    )
    long = "Short sentence first. " + "word " * 100
    assert summarise_docstring(long, max_chars=60) == "Short sentence first."


def test_miner_removes_docstrings_and_keeps_parseable_code(source_tree):
    pairs, stats = _mine(source_tree, name_pairs=False)
    by_name = {p.name: p for p in pairs}
    assert set(by_name) == {"parse_header_line", "RingBuffer", "oldest_item_index", "running_mean"}
    assert stats.files == 3 and stats.files_unparsable == 1  # tests folder skipped, broken file counted
    header = by_name["parse_header_line"]
    assert header.query == "Split an HTTP header line into its name and value."
    assert header.code.startswith('def parse_header_line(line, sep=":"):\n    name, _, value')
    assert "Split an HTTP" not in header.code and '"""' not in header.code
    method = by_name["oldest_item_index"]
    assert method.code.startswith("@functools.lru_cache(maxsize=None)\ndef oldest_item_index(self):\n")
    assert "oldest element" not in method.code
    assert "fixed-size" not in by_name["RingBuffer"].code
    assert by_name["running_mean"].query.startswith("Compute the running mean")  # leading comment
    assert "#" not in by_name["running_mean"].code
    for p in pairs:
        ast.parse(p.code)
        assert p.task == "doc"
    assert stats.duplicate_code == 1  # b.py's copy of parse_header_line


def test_miner_can_keep_the_docstring_without_its_query(source_tree):
    strict, _ = _mine(source_tree, name_pairs=False)
    kept, stats = _mine(source_tree, name_pairs=False, docstring_rest=True)
    by_name = {p.name: p for p in kept}
    header = by_name["parse_header_line"]
    assert header.query == "Split an HTTP header line into its name and value."
    # the first paragraph (the query) is gone, the rest of the docstring stays, and the code parses
    assert "Split an HTTP" not in header.code
    assert '"""The name is lower-cased; surrounding whitespace is stripped."""' in header.code
    assert ast.get_docstring(ast.parse(header.code).body[0]) == (
        "The name is lower-cased; surrounding whitespace is stripped."
    )
    # one-paragraph docstrings leave nothing to keep; the same pairs are mined either way
    assert "fixed-size" not in by_name["RingBuffer"].code and '"""' not in by_name["oldest_item_index"].code
    assert [(p.name, p.query) for p in kept] == [(p.name, p.query) for p in strict]
    assert stats.code_unparsable == 0


def test_miner_name_pairs_tests_and_determinism(source_tree):
    pairs, _ = _mine(source_tree, name_pairs_share=1.0)
    names = {p.query: p for p in pairs if p.task == "name"}
    assert "merge sorted lists" in names
    assert names["merge sorted lists"].code.startswith("def merge_sorted_lists(left, right):")
    assert all(p.name != "__init__" for p in pairs)  # dunders make no name pair
    again, _ = _mine(source_tree, name_pairs_share=1.0)
    assert again == pairs
    with_tests, stats = _mine(source_tree, include_tests=True)
    assert stats.files == 4 and any(p.name == "test_it" for p in with_tests)
    few, _ = _mine(source_tree, max_pairs=2, seed=3)
    assert len(few) == 2 and few == _mine(source_tree, max_pairs=2, seed=3)[0]


def test_miner_excludes_cosqa_functions(source_tree, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"_id": "c0", "title": "", "text": COSQA_FUNCTION},
        # unparsable in isolation (bad indentation): matched on the whitespace-free text
        {
            "_id": "c1",
            "title": "",
            "text": "def merge_sorted_lists(left, right):\n  result = []\n    while left and right:",
        },
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs, stats = _mine(source_tree, exclude_corpus=corpus)
    assert "running_mean" not in {p.name for p in pairs}
    assert stats.excluded_cosqa == 1 and stats.cosqa_functions == 2 and stats.cosqa_unparsable == 1
    # the name + body key catches a changed signature
    variant = COSQA_FUNCTION.replace("def running_mean(values):", "def running_mean(values: list):")
    corpus.write_text(json.dumps({"_id": "c0", "text": variant}) + "\n")
    pairs, stats = _mine(source_tree, exclude_corpus=corpus)
    assert "running_mean" not in {p.name for p in pairs} and stats.excluded_cosqa == 1


def test_miner_checks_its_options(source_tree, tmp_path):
    from kvrag.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="max_pairs"):
        _mine(source_tree, max_pairs=0)
    with pytest.raises(InvalidInputError, match="name_pairs_share"):
        _mine(source_tree, name_pairs_share=1.5)
    with pytest.raises(InvalidInputError, match="CoSQA"):
        _mine(source_tree, exclude_corpus=tmp_path / "absent.jsonl")
