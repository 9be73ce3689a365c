"""Tests for the `kvrag` command line (service.cli.main) with the tiny random encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrag.service.cli import main

DOCS = {
    "en.md": "# Garden\n\nThe garden is full of roses in the summer and the bees are busy all day long.\n",
    "de.md": "# Garten\n\nDer Garten ist im Sommer voll mit Rosen und die Bienen sind den ganzen Tag fleißig.\n",
    "util.py": "def add(a, b):\n    return a + b\n",
}


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llama_dir) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("KVRAG_HOME", str(home))
    monkeypatch.setenv("KVRAG_EMBEDDING_CACHE", "false")
    monkeypatch.setenv("KVRAG_GENERATOR", str(tiny_llama_dir))
    return home


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "skip.bin").write_bytes(b"\x00")
    return d


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def index_argv(model_dir: Path, *paths: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "index",
        "--collection",
        "t",
        "--encoder",
        str(model_dir),
        "--max-tokens",
        "64",
        "--overlap-tokens",
        "8",
        "--json",
        *extra,
        *map(str, paths),
    ]


def test_index_then_query(home, src, tiny_model_dir, capsys):
    report = run_json(capsys, index_argv(tiny_model_dir, src))
    assert report["collection"] == "t"
    assert (report["documents_seen"], report["added"], report["replaced"], report["unchanged"]) == (
        3,
        3,
        0,
        0,
    )
    assert report["documents"] == 3
    assert report["passages"] == report["passages_added"] == 3
    assert report["skipped_files"] == [f"{src.resolve() / 'skip.bin'} (unsupported type)"]
    assert (home / "collections" / "t" / "passages.sqlite").exists()

    out = run_json(
        capsys, ["query", "--search-only", "--collection", "t", "--k", "2", "--json", "roses in the garden"]
    )
    assert out["query"] == "roses in the garden" and out["collection"] == "t"
    assert len(out["hits"]) == 2
    sources = {str(src.resolve() / n) for n in DOCS}
    for h in out["hits"]:
        assert {
            "passage_id",
            "score",
            "doc_id",
            "title",
            "source",
            "text",
            "start",
            "end",
            "lang",
            "kind",
        } <= set(h)
        assert h["source"] in sources
        assert h["text"] == DOCS[Path(h["source"]).name][h["start"] : h["end"]]
    assert out["hits"][0]["score"] >= out["hits"][1]["score"]

    # the exact passage text finds its own passage first
    exact = DOCS["util.py"].strip()
    out = run_json(capsys, ["query", "--search-only", "--collection", "t", "--k", "1", "--json", exact])
    assert [(h["text"], h["kind"], h["lang"], h["section"]) for h in out["hits"]] == [
        (exact, "code", "python", "def add")
    ]

    out = run_json(
        capsys,
        [
            "query",
            "--search-only",
            "--collection",
            "t",
            "--k",
            "5",
            "--json",
            "--filter",
            '{"lang": "de"}',
            "Rosen",
        ],
    )
    assert [h["doc_id"] for h in out["hits"]] == [str(src.resolve() / "de.md")]

    out = run_json(
        capsys, ["query", "--search-only", "--collection", "t", "--k", "3", "--json", "--hybrid", "Bienen"]
    )
    assert out["hits"][0]["doc_id"] == str(src.resolve() / "de.md")

    # a second run is a no-op
    again = run_json(capsys, index_argv(tiny_model_dir, src))
    assert (again["unchanged"], again["added"], again["passages_added"], again["passages"]) == (3, 0, 0, 3)


def test_text_output_and_prune(home, src, tiny_model_dir, capsys):
    assert main(["index", "--collection", "t", "--encoder", str(tiny_model_dir), str(src)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t: 3 added, 0 replaced, 0 unchanged, 0 pruned; 3 documents, 3 passages")
    assert f"skipped {src.resolve() / 'skip.bin'} (unsupported type)" in out

    assert (
        main(["query", "--search-only", "--collection", "t", "--k", "1", "def add(a, b):\n    return a + b"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: def add(a, b):\n    return a + b".splitlines()[0]
    assert any(" 1. [" in line and "util :: def add (python, code)" in line for line in lines)

    (src / "en.md").unlink()
    # the collection already exists: --encoder may be left out
    report = run_json(capsys, ["index", "--collection", "t", "--prune", "--json", str(src)])
    assert (report["pruned"], report["unchanged"], report["documents"], report["passages_removed"]) == (
        1,
        2,
        2,
        1,
    )


def test_unknown_collection(home, capsys):
    assert main(["query", "--collection", "nope", "--json", "anything"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no collection 'nope'")
    assert not (home / "collections" / "nope").exists()


def test_invalid_collection_name(home, capsys):
    assert main(["query", "--collection", "../x", "anything"]) == 2
    assert "invalid collection name" in capsys.readouterr().err


def test_bad_filter_json(home, src, tiny_model_dir, capsys):
    run_json(capsys, index_argv(tiny_model_dir, src))
    assert (
        main(["query", "--search-only", "--collection", "t", "--json", "--filter", "{lang: de", "roses"]) == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: --filter is not valid JSON" in captured.err
    # valid JSON that is not a usable filter
    assert (
        main(
            [
                "query",
                "--search-only",
                "--collection",
                "t",
                "--json",
                "--filter",
                '{"lang": {"x": 1}}',
                "roses",
            ]
        )
        == 2
    )
    assert "error: filter value for 'lang'" in capsys.readouterr().err
    assert main(["query", "--search-only", "--collection", "t", "--json", "--filter", "[1]", "roses"]) == 2
    assert "error: a filter is a non-empty JSON object" in capsys.readouterr().err
    assert main(["query", "--search-only", "--collection", "t", "--json", "--k", "0", "roses"]) == 2
    assert "error: k must be between 1 and 1000" in capsys.readouterr().err


def test_missing_path(home, tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "no-such-folder"
    assert main(index_argv(tiny_model_dir, missing)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: {missing}: no such file or folder" in captured.err


def test_usage_errors_exit_via_argparse(home, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["query", "--json", "text without a collection"])
    assert exc.value.code == 2
    assert "--collection" in capsys.readouterr().err


def test_failed_first_index_creates_no_collection(home, tmp_path, tiny_model_dir, capsys):
    assert main(index_argv(tiny_model_dir, tmp_path / "typo")) == 2
    assert not (home / "collections" / "t").exists()


def test_training_is_not_a_product_command(capsys):
    """Models are trained from a checkout (`python -m training.code_adapter`, `python -m training.compressor`)."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "code-adapter", "--out", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_a_lazy_collection_is_indexed_without_passage_caches(home, src, tiny_model_dir, capsys):
    lazy = run_json(capsys, index_argv(tiny_model_dir, src, extra=("--kv-policy", "lazy")))
    assert lazy["kv_policy"] == "lazy" and "kv" not in lazy
    assert not (home / "kv").exists() or not any((home / "kv").rglob("*.kv"))
    # the policy is the collection's: a later run without the option keeps it
    again = run_json(capsys, index_argv(tiny_model_dir, src))
    assert again["kv_policy"] == "lazy" and "kv" not in again
