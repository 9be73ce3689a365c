"""The generation side of the `kvrag` command line: passage KV at indexing, answers, `bench ttft`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrag.service.cli import main

DOCS = {
    "garden.md": "# Garden\n\nThe garden is full of roses in the summer and the bees are busy all day long.\n",
    "bridge.md": "# Bridge\n\nThe old stone bridge crosses the river near the mill; it was built in 1850.\n",
    "mars.md": "# Mars\n\nMars is the fourth planet from the sun and is often called the red planet.\n",
}
QUESTION = "What is the garden full of?"
SQUAD = {
    "data": [
        {
            "title": "Nature",
            "paragraphs": [
                {
                    "context": "The garden is full of roses in the summer.",
                    "qas": [
                        {"id": "a", "question": "What is the garden full of?", "answers": [{"text": "roses"}]}
                    ],
                },
                {
                    "context": "The old bridge was built in 1850 from stone.",
                    "qas": [
                        {"id": "b", "question": "When was the bridge built?", "answers": [{"text": "1850"}]}
                    ],
                },
                {
                    "context": "Mars is called the red planet.",
                    "qas": [{"id": "c", "question": "Which planet is red?", "answers": [{"text": "Mars"}]}],
                },
            ],
        }
    ]
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
    return d


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def run_text(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def index_argv(encoder_dir: Path, src: Path, *extra: str, collection: str = "t") -> list[str]:
    return ["index", "--collection", collection, "--encoder", str(encoder_dir), "--json", *extra, str(src)]


@pytest.fixture
def indexed(home, src, tiny_model_dir, capsys) -> dict:
    """Collection `t` with its passage caches in the default store ($KVRAG_HOME/kv)."""
    return run_json(capsys, index_argv(tiny_model_dir, src))


# ---------------------------------------------------------------------------------------------- index


def test_index_computes_passage_kv_once(home, src, tiny_model_dir, indexed, capsys) -> None:
    report = indexed
    assert report["passages"] == 3
    kv = report["kv"]
    assert kv["kv_computed"] == report["passages"] and kv["kv_present"] == 0
    assert kv["kv_bytes_written"] > 0 and kv["store_errors"] == 0
    assert kv["codec"] == "fp16"
    assert kv["url"] == (home / "kv").as_uri()
    blobs = list((home / "kv").rglob("*.kv"))
    assert len(blobs) == 3 + 1  # the passages and the shared prefix

    again = run_json(capsys, index_argv(tiny_model_dir, src))
    assert again["unchanged"] == 3
    assert (again["kv"]["kv_computed"], again["kv"]["kv_present"], again["kv"]["kv_bytes_written"]) == (
        0,
        3,
        0,
    )
    assert len(list((home / "kv").rglob("*.kv"))) == 4

    # another codec is another set of caches
    other = run_json(capsys, index_argv(tiny_model_dir, src, "--kv-codec", "int8"))
    assert other["kv"]["kv_computed"] == 3 and other["kv"]["codec"] == "int8"


def test_index_no_kv_skips_the_precompute(home, src, tiny_model_dir, capsys) -> None:
    report = run_json(capsys, index_argv(tiny_model_dir, src, "--no-kv"))
    assert report["passages"] == 3 and "kv" not in report
    assert not (home / "kv").exists() or not list((home / "kv").rglob("*.kv"))
    later = run_json(capsys, index_argv(tiny_model_dir, src))
    assert later["kv"]["kv_computed"] == 3


def test_index_kv_url_writes_there(home, src, tiny_model_dir, tmp_path, capsys) -> None:
    where = tmp_path / "elsewhere"
    report = run_json(capsys, index_argv(tiny_model_dir, src, "--kv-url", where.as_uri()))
    assert report["kv"]["kv_computed"] == 3
    assert report["kv"]["url"] == where.as_uri()
    assert len(list(where.rglob("*.kv"))) == 4
    assert not (home / "kv").exists()


def test_index_text_output_reports_kv(home, src, tiny_model_dir, capsys) -> None:
    out = run_text(capsys, ["index", "--collection", "t", "--encoder", str(tiny_model_dir), str(src)])
    assert "3 passages" in out
    assert "passage KV (fp16, " in out and "3 computed, 0 already stored" in out


# ---------------------------------------------------------------------------------------------- query


def test_query_answers_with_citations(indexed, capsys) -> None:
    out = run_text(capsys, ["query", "--collection", "t", "--k", "2", "--max-tokens", "6", QUESTION])
    lines = out.splitlines()
    assert lines[0] == f"question: {QUESTION}"
    assert lines[1].startswith("answer: ")
    assert "sources:" in lines
    sources = lines[lines.index("sources:") + 1 :]
    assert sources[0].startswith("  [1] ") and sources[1].startswith("  [2] ")
    assert "(passage " in sources[0] and ", document " in sources[0]
    assert any(line.startswith("mode ape: time to first token ") for line in lines)


def test_query_json(indexed, capsys) -> None:
    out = run_json(
        capsys, ["query", "--collection", "t", "--k", "2", "--max-tokens", "6", "--json", QUESTION]
    )
    assert out["collection"] == "t" and out["question"] == QUESTION and out["mode"] == "ape"
    assert isinstance(out["text"], str)
    assert [c["rank"] for c in out["citations"]] == [1, 2]
    for c in out["citations"]:
        assert {"passage_id", "doc_id", "title", "source", "score"} <= set(c)
        assert c["title"] in {"Garden", "Bridge", "Mars"}
    assert {"retrieval_ms", "kv_fetch_ms", "prefill_ms", "ttft_ms", "decode_tok_s"} <= set(out["timings"])
    assert out["usage"]["prompt_tokens"] > 0 and 0 <= out["usage"]["completion_tokens"] <= 6
    # the caches were computed at indexing time
    assert (out["kv"]["hits"], out["kv"]["misses"]) == (2, 0)

    hits = run_json(capsys, ["query", "--collection", "t", "--k", "2", "--search-only", "--json", QUESTION])
    assert [c["passage_id"] for c in out["citations"]] == [h["passage_id"] for h in hits["hits"]]


def test_query_stream_prints_the_answer(indexed, capsys) -> None:
    argv = ["query", "--collection", "t", "--k", "2", "--max-tokens", "6", QUESTION]
    answer = run_json(capsys, [*argv, "--json"])
    out = run_text(capsys, [*argv, "--stream"])
    head = f"question: {QUESTION}\nanswer: "
    assert out.startswith(head)
    streamed = out[len(head) :].split("\nsources:\n")[0]
    assert streamed.strip() == answer["text"]
    assert "\nsources:\n  [1] " in out


def test_query_search_only(indexed, capsys) -> None:
    out = run_text(capsys, ["query", "--collection", "t", "--k", "2", "--search-only", QUESTION])
    lines = out.splitlines()
    assert lines[0] == f"query: {QUESTION}"
    assert sum(1 for line in lines if line.startswith(" 1. [") or line.startswith(" 2. [")) == 2
    assert "answer:" not in out


def test_query_modes(indexed, capsys) -> None:
    base = ["query", "--collection", "t", "--k", "1", "--max-tokens", "6", "--json", QUESTION]
    seq = run_json(capsys, [*base, "--mode", "sequential"])
    assert seq["mode"] == "sequential" and seq["kv"] == {}
    assert seq["timings"]["kv_fetch_ms"] == 0
    par = run_json(capsys, [*base, "--mode", "parallel"])
    assert par["mode"] == "parallel" and par["kv"]["hits"] == 1
    # one passage: parallel prefill is sequential prefill (greedy, same positions)
    assert par["text"] == seq["text"]
    text = run_text(capsys, [*base[:-2], "--mode", "sequential", QUESTION])
    assert "mode sequential: time to first token" in text
    # blend: one passage follows the prefix exactly, nothing to recompute, same answer
    blend = run_json(capsys, [*base, "--mode", "blend", "--blend-ratio", "0.5"])
    assert blend["mode"] == "blend" and blend["text"] == seq["text"]
    assert main([*base, "--mode", "blend", "--blend-ratio", "2"]) == 2
    assert "--blend-ratio" in capsys.readouterr().err


def test_query_errors(home, capsys) -> None:
    assert main(["query", "--collection", "nope", "--json", QUESTION]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: no collection 'nope'")
    assert main(["query", "--collection", "nope", "--search-only", QUESTION]) == 2


def test_query_bad_k_and_empty_question(indexed, capsys) -> None:
    capsys.readouterr()
    assert main(["query", "--collection", "t", "--k", "0", QUESTION]) == 2
    assert "k must be" in capsys.readouterr().err
    assert main(["query", "--collection", "t", "  "]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------- bench


def test_bench_ttft(home, tmp_path, capsys) -> None:
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD), encoding="utf-8")
    argv = ["bench", "ttft", "--k", "2", "--questions", "1", "--repeats", "1", "--data", str(data)]
    out = run_json(capsys, [*argv, "--kv-url", "memory://", "--json"])
    for key in ("sequential_ttft_ms", "ape_ttft_ms", "speedup", "context_tokens", "kv_fetch_ms"):
        assert isinstance(out[key], int | float), key
        assert out[key] > 0, key
    assert out["k"] == 2 and out["questions"] == 1 and out["repeats"] == 1
    assert out["kv_bytes"] > 0 and out["kv_url"].startswith("memory://")
    assert out["speedup"] == pytest.approx(out["sequential_ttft_ms"] / out["ape_ttft_ms"], rel=0.05, abs=0.01)
    assert "blend" not in out
    blend = run_json(capsys, [*argv, "--kv-url", "memory://", "--blend-ratio", "0,1", "--json"])
    assert set(blend["blend"]) == {"0.0", "1.0"}
    for r in ("0.0", "1.0"):
        b = blend["blend"][r]
        assert b["ttft_ms"] > 0
        assert b["speedup"] == pytest.approx(blend["sequential_ttft_ms"] / b["ttft_ms"], rel=0.05, abs=0.01)

    assert main([*argv, "--k", "5", "--kv-url", "memory://", "--json"]) == 2  # only 3 paragraphs
    assert "k=5" in capsys.readouterr().err


def test_bench_ttft_takes_more_questions_than_paragraphs(home, tmp_path, capsys) -> None:
    """`_pieces` picks one question per paragraph first, "then more": --questions 3 over k=2
    paragraphs that have 3 questions between them should time 3 questions."""
    squad = json.loads(json.dumps(SQUAD))
    first = squad["data"][0]["paragraphs"][0]
    first["qas"].append(
        {"id": "a2", "question": "When is the garden full of roses?", "answers": [{"text": "summer"}]}
    )
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad), encoding="utf-8")
    argv = ["bench", "ttft", "--k", "2", "--questions", "3", "--repeats", "1", "--data", str(data)]
    out = run_json(capsys, [*argv, "--kv-url", "memory://", "--json"])
    assert out["questions"] == 3
