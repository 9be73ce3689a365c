"""SQuAD answer metrics, the SQuAD reader, and `kvrag eval rag` end to end with the tiny models."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from kvrag.errors import InvalidInputError
from kvrag.rag.eval.rag import RagEvalConfig, Variant, collection_name, open_eval_collection, run_rag_eval
from kvrag.rag.eval.squad import best_score, exact_match, f1_score, load_squad, normalize_answer
from kvrag.service.cli import main

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Garden_Life",
            "paragraphs": [
                {
                    "context": "The garden is full of roses in the summer. The bees visit the roses every morning.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "What is the garden full of?",
                            "answers": [
                                {"text": "roses", "answer_start": 22},
                                {"text": "roses", "answer_start": 22},
                                {"text": "the roses", "answer_start": 62},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "When do the bees visit the roses?",
                            "answers": [{"text": "every morning", "answer_start": 70}],
                        },
                    ],
                },
                {
                    "context": "The old bridge crosses the river near the mill. It was built in 1850 from stone.",
                    "qas": [
                        {
                            "id": 3,
                            "question": "When was the bridge built?",
                            "answers": [{"text": "1850", "answer_start": 64}],
                        }
                    ],
                },
            ],
        },
        {
            "title": "Space",
            "paragraphs": [
                {
                    "context": "Mars is the fourth planet from the sun and is often called the red planet.",
                    "qas": [
                        {
                            "id": "q4",
                            "question": "Which planet is called the red planet?",
                            "answers": [{"text": "Mars", "answer_start": 0}],
                        }
                    ],
                }
            ],
        },
    ],
}


def write_squad(folder: Path, data: object = SQUAD, name: str = "tiny-squad.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat,  an  owl and THE dog!! ", "cat owl and dog"),
        ("Theory of an anthem", "theory of anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("rock-'n'-roll", "rocknroll"),
        ("the", ""),
        ("", ""),
        ("A\tb\nc", "b c"),
        ("(1850)", "1850"),
        ("Éclair «au» chocolat", "éclair «au» chocolat"),  # only ASCII punctuation goes
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match() -> None:
    assert exact_match("The Roses.", "roses") == 1.0
    assert exact_match("roses", "red roses") == 0.0
    assert exact_match("an apple", "APPLE!") == 1.0
    assert exact_match("", "the") == 1.0  # both normalise to nothing
    assert isinstance(exact_match("a", "b"), float)


def test_f1_score() -> None:
    assert f1_score("roses", "roses") == 1.0
    assert f1_score("The roses!", "roses") == 1.0
    # pred {big, red, dog}, gold {red, dog, house}: 2 common, P = R = 2/3
    assert f1_score("the big red dog", "red dog house") == pytest.approx(2 / 3)
    # pred {red}, gold {red, dog, house}: P = 1, R = 1/3 -> F1 = 0.5
    assert f1_score("red", "red dog house") == pytest.approx(0.5)
    # pred {red, red, dog}, gold {red, dog}: counts clip at the gold's: 2 common, P = 2/3, R = 1 -> 0.8
    assert f1_score("red red dog", "red dog") == pytest.approx(0.8)
    assert f1_score("cats", "dogs") == 0.0
    assert f1_score("", "dogs") == 0.0
    assert f1_score("the", "a") == 0.0  # nothing left after normalisation (SQuAD v1.1 script)
    assert f1_score("in 1850", "1850") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_best_score_is_the_max_over_golds() -> None:
    golds = ["red dog house", "dog", "a cat"]
    assert best_score(exact_match, "The dog", golds) == 1.0
    assert best_score(f1_score, "red dog", golds) == pytest.approx(max(0.8, 2 / 3))
    assert best_score(f1_score, "cat food", golds) == pytest.approx(2 / 3)
    assert best_score(f1_score, "zebra", golds) == 0.0
    assert best_score(exact_match, "dog", []) == 0.0


# ----------------------------------------------------------------------------------------------- reader


def test_load_squad(tmp_path: Path) -> None:
    paragraphs, questions = load_squad(write_squad(tmp_path))
    assert [p.id for p in paragraphs] == ["p0", "p1", "p2"]
    assert [p.title for p in paragraphs] == ["Garden Life", "Garden Life", "Space"]
    assert paragraphs[1].context.startswith("The old bridge")
    assert [q.id for q in questions] == ["q1", "q2", "3", "q4"]
    assert [q.paragraph_id for q in questions] == ["p0", "p0", "p1", "p2"]
    assert questions[0].answers == ("roses", "the roses")  # duplicates dropped, order kept
    assert questions[3].question == "Which planet is called the red planet?"
    # str paths work too
    assert load_squad(str(tmp_path / "tiny-squad.json"))[1] == questions


def test_load_squad_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        load_squad(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not a SQuAD-format"):
        load_squad(bad)
    with pytest.raises(InvalidInputError, match="not a SQuAD-format"):
        load_squad(write_squad(tmp_path, {"version": "1.1"}, "nodata.json"))
    with pytest.raises(InvalidInputError, match="no questions"):
        load_squad(write_squad(tmp_path, {"data": []}, "empty.json"))
    no_qas = {"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": []}]}]}
    with pytest.raises(InvalidInputError, match="no questions"):
        load_squad(write_squad(tmp_path, no_qas, "noqas.json"))


@pytest.mark.parametrize(
    "data",
    [
        [],  # valid JSON, but an array
        {"data": [{"title": "x"}]},  # an article without paragraphs
        {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q?"}]}]}]},  # no answers
    ],
    ids=["array", "no-paragraphs", "no-answers"],
)
def test_load_squad_rejects_malformed_structure(tmp_path: Path, data: object) -> None:
    """Well-formed JSON that is not SQuAD must be a user error (CLI exit 2), not a crash."""
    with pytest.raises(InvalidInputError):
        load_squad(write_squad(tmp_path, data, "malformed.json"))


# ------------------------------------------------------------------------------------- eval collection


def test_eval_collection_is_built_with_the_given_encoder(
    tmp_path: Path, tiny_encoder, tiny_model_dir
) -> None:
    """The eval collection must record (and search with) the encoder it was indexed with."""
    data = write_squad(tmp_path)
    collection = open_eval_collection(tmp_path / "home", data, tiny_encoder, str(tiny_model_dir))
    try:
        assert collection.name == collection_name(data, str(tiny_model_dir)) != collection_name(data)
        assert collection.store.counts()["documents"] == 3
        assert collection.config.encoder == tiny_encoder.name
        hits = collection.search("When was the bridge built?", tiny_encoder, k=2)
        assert len(hits) == 2
    finally:
        collection.close()


def test_variants() -> None:
    assert Variant.of("sequential", 0.5, 0.5) == Variant("sequential", "sequential")
    ape = Variant.of("ape", 0.5, 0.7)
    assert (ape.name, ape.mode, ape.temperature, ape.scale) == ("ape(T=0.5,S=0.7)", "ape", 0.5, 0.7)
    with pytest.raises(InvalidInputError):
        Variant.of("beam", 1.0, 1.0)
    d = Variant.of("ape", 0.9, 1.0, positions="distinct")
    assert (d.name, d.positions) == ("ape(T=0.9,S=1.0,distinct)", "distinct")
    assert Variant.of("parallel", 1.0, 1.0, positions="distinct").name == "parallel(distinct)"
    # blend always moves passages; sequential has no cached passages to place
    assert Variant.of("sequential", 1.0, 1.0, positions="distinct").positions == "shared"
    with pytest.raises(InvalidInputError, match="positions"):
        Variant.of("ape", 0.9, 1.0, positions="stacked")


def test_run_rag_eval_rejects_bad_ranges(
    tmp_path: Path, tiny_encoder, tiny_generator, tiny_model_dir
) -> None:
    from kvrag.rag.kvcache import MemoryStore
    from kvrag.rag.kvcache.manager import KVCacheManager
    from kvrag.rag.pipeline import RagPipeline

    data = write_squad(tmp_path)
    home = tmp_path / "home"
    collection = open_eval_collection(home, data, tiny_encoder, str(tiny_model_dir))
    try:
        pipe = RagPipeline(
            collection, tiny_encoder, tiny_generator, KVCacheManager(tiny_generator, MemoryStore())
        )
        for kwargs in ({"offset": -1}, {"limit": 0}, {"offset": 4}):
            with pytest.raises(InvalidInputError):
                run_rag_eval(RagEvalConfig(data=data, k=2, max_new_tokens=2, **kwargs), pipe)
        out = run_rag_eval(
            RagEvalConfig(
                data=data, k=3, offset=3, limit=5, max_new_tokens=2, variants=[Variant.of("ape", 1, 1)]
            ),
            pipe,
        )
        assert out["questions"] == 1 and out["offset"] == 3 and "recall@3" in out
        assert out["temperature"] == 1 and out["mode"] == "ape"
        assert out["kv_index"]["kv_computed"] == 3
    finally:
        collection.close()


# ---------------------------------------------------------------------------------------------- the CLI


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    root = tmp_path_factory.mktemp("eval-cli")
    home = root / "home"
    data = write_squad(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRAG_HOME", str(home))
        mp.setenv("KVRAG_EMBEDDING_CACHE", "false")
        mp.setenv("KVRAG_GENERATOR", str(tiny_llama_dir))
        base = [
            "eval",
            "rag",
            "--data",
            str(data),
            "--k",
            "2",
            "--kv-url",
            "memory://",
            "--generator",
            str(tiny_llama_dir),
            "--encoder",
            str(tiny_model_dir),
            "--max-tokens",
            "4",
            "--json",
        ]
        yield base, home, data


@pytest.fixture(scope="module")
def three_modes(cli_env) -> dict:
    base, _, _ = cli_env
    code, out, err = run_cli(
        [*base, "--mode", "sequential,parallel,ape", "--ape-temperature", "0.5", "--ape-scale", "0.5"]
    )
    assert code == 0, err
    return json.loads(out)


def test_eval_rag_three_modes(three_modes: dict, cli_env) -> None:
    _, _, data = cli_env
    r = three_modes
    assert r["questions"] == 4 and r["offset"] == 0 and r["k"] == 2
    assert 0.0 <= r["recall@2"] <= 1.0
    assert r["data"] == str(data)
    assert r["kv_url"].startswith("memory://") and r["kv_codec"] == "fp16"
    assert r["kv_index"]["kv_computed"] == 3
    # 4 questions x 2 cached variants x k = 2: all hits, the caches were computed at indexing time
    assert r["kv_counters"]["hits"] == 16 and r["kv_counters"]["misses"] == 0
    assert "em" not in r
    assert list(r["variants"]) == ["sequential", "parallel", "ape(T=0.5,S=0.5)"]
    for name, v in r["variants"].items():
        assert {"em", "f1", "gold_logprob", "ttft_ms", "ttft_split_ms", "decode_tok_s"} <= set(v), name
        assert 0.0 <= v["em"] <= 1.0 and 0.0 <= v["f1"] <= 1.0
        assert v["gold_logprob"] < 0
        assert v["ttft_ms"] > 0 and v["decode_tok_s"] > 0
        assert set(v["ttft_split_ms"]) == {"retrieval", "kv_fetch", "prefill"}
        assert v["ttft_split_ms"]["prefill"] > 0
        assert v["answer_tokens_mean"] <= 4
    assert r["variants"]["sequential"]["ttft_split_ms"]["kv_fetch"] == 0
    assert r["variants"]["parallel"]["ttft_split_ms"]["kv_fetch"] > 0
    ape = r["variants"]["ape(T=0.5,S=0.5)"]
    assert (ape["mode"], ape["temperature"], ape["scale"]) == ("ape", 0.5, 0.5)
    assert r["variants"]["parallel"]["gold_logprob"] != ape["gold_logprob"]
    assert r["variants"]["sequential"]["gold_logprob"] != ape["gold_logprob"]


def test_eval_rag_single_mode_and_range(three_modes: dict, cli_env) -> None:
    base, _, _ = cli_env
    code, out, err = run_cli([*base, "--mode", "sequential"])
    assert code == 0, err
    single = json.loads(out)
    assert "variants" not in single and single["questions"] == 4
    for key in ("em", "f1", "gold_logprob", "ttft_ms", "ttft_split_ms", "decode_tok_s"):
        assert key in single
    assert single["mode"] == "sequential"
    # same retrieval, same greedy decoding: the scores of the multi-variant run
    seq = three_modes["variants"]["sequential"]
    for key in ("em", "f1", "gold_logprob", "answer_tokens_mean"):
        assert single[key] == seq[key], key
    assert single["recall@2"] == three_modes["recall@2"]
    assert single["kv_index"]["kv_computed"] == 3  # a fresh memory store

    code, out, err = run_cli([*base, "--mode", "ape", "--offset", "1", "--limit", "2"])
    assert code == 0, err
    part = json.loads(out)
    assert part["questions"] == 2 and part["offset"] == 1
    assert part["mode"] == "ape" and part["kv_counters"]["hits"] == 2 * 2

    code, out, err = run_cli([*base, "--mode", "parallel", "--offset", "3"])
    assert code == 0, err
    assert json.loads(out)["questions"] == 1


def test_eval_rag_blend_ratios(three_modes: dict, cli_env) -> None:
    base, _, _ = cli_env
    code, out, err = run_cli([*base, "--mode", "sequential,blend", "--blend-ratio", "0,1"])
    assert code == 0, err
    r = json.loads(out)
    assert list(r["variants"]) == ["sequential", "blend(r=0.0)", "blend(r=1.0)"]
    full, none = r["variants"]["blend(r=1.0)"], r["variants"]["blend(r=0.0)"]
    assert (full["mode"], full["blend_ratio"], full["positions"]) == ("blend", 1.0, "distinct")
    # everything recomputed is a sequential prefill: same scores
    seq = three_modes["variants"]["sequential"]
    for key in ("em", "f1", "answer_tokens_mean"):
        assert full[key] == seq[key], key
    # (the cached prefix and first passage are fp16, the sequential prefill fp32)
    assert abs(full["gold_logprob"] - seq["gold_logprob"]) < 5e-3
    assert abs(none["gold_logprob"] - seq["gold_logprob"]) > 5e-2
    code, out, err = run_cli([*base, "--mode", "blend", "--blend-ratio", "x"])
    assert code == 2 and "--blend-ratio" in err


def test_eval_rag_cli_errors(cli_env, tmp_path: Path) -> None:
    base, _, data = cli_env
    code, out, err = run_cli([*base, "--mode", "beam"])
    assert code == 2 and out == "" and "unknown mode" in err
    missing = [a if a != str(data) else str(tmp_path / "nope.json") for a in base]
    code, out, err = run_cli(missing)
    assert code == 2 and "no such file" in err
    code, out, err = run_cli([*base, "--mode", "ape", "--ape-grid", "0.5"])
    assert code == 2 and "--ape-grid" in err
    code, out, err = run_cli([*base, "--mode", "ape", "--ape-grid", "0.5:1.0:sideways"])
    assert code == 2 and "--ape-grid" in err


def test_eval_rag_runs_a_variant_named_twice_once(cli_env) -> None:
    base, _, _ = cli_env
    argv = [*base, "--mode", "ape", "--ape-temperature", "0.5", "--ape-scale", "0.5", "--limit", "2"]
    code, out, err = run_cli([*argv, "--ape-grid", "0.5:0.5"])
    assert code == 0, err
    twice = json.loads(out)
    code, out, err = run_cli(argv)
    assert code == 0, err
    once = json.loads(out)
    assert "variants" not in twice and twice["mode"] == "ape"
    # each question answered once: the same kv hits (k = 2 per question) and scores as a single run
    assert twice["kv_counters"]["hits"] == once["kv_counters"]["hits"] == 2 * 2
    assert twice["f1"] == once["f1"] and twice["gold_logprob"] == once["gold_logprob"]


def test_eval_rag_grid_with_distinct_positions(three_modes: dict, cli_env) -> None:
    base, _, _ = cli_env
    code, out, err = run_cli(
        [*base, "--mode", "ape", "--ape-temperature", "0.5", "--ape-scale", "0.5"]
        + ["--ape-grid", "0.5:0.5:distinct,1.0:1.0:shared"]
    )
    assert code == 0, err
    r = json.loads(out)["variants"]
    assert list(r) == ["ape(T=0.5,S=0.5)", "ape(T=0.5,S=0.5,distinct)", "ape(T=1.0,S=1.0)"]
    assert r["ape(T=0.5,S=0.5,distinct)"]["positions"] == "distinct"
    # the same variant at shared positions is the one of the earlier run: same scores
    shared = three_modes["variants"]["ape(T=0.5,S=0.5)"]
    assert r["ape(T=0.5,S=0.5)"]["gold_logprob"] == pytest.approx(shared["gold_logprob"], abs=1e-6)
    # T = S = 1 is plain parallel attention
    par = three_modes["variants"]["parallel"]
    assert r["ape(T=1.0,S=1.0)"]["gold_logprob"] == pytest.approx(par["gold_logprob"], abs=1e-4)
    # moving the passages changes what the model reads
    assert r["ape(T=0.5,S=0.5,distinct)"]["gold_logprob"] != pytest.approx(shared["gold_logprob"], abs=1e-4)
