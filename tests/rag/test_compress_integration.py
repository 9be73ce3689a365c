"""Compressed passages at indexing and in `eval rag`: the KV is computed from the compressed text while
embeddings, BM25 and citations stay on the original."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvrag.index.collection import Collection
from kvrag.index.store import PassageStore
from kvrag.rag.pipeline import passage_text
from kvrag.service.cli import main
from kvrag.service.runtime import open_generator, open_kv
from kvrag.service.settings import get_settings

DOCS = {
    "garden.md": "# Garden\n\nThe garden behind the old house is full of red roses in the summer, and the busy"
    " bees visit every flower from the early morning until the evening light fades over the quiet hills.\n",
    "bridge.md": "# Bridge\n\nThe old stone bridge crosses the wide river near the water mill; it was built in"
    " 1850 by the people of the village, who carried every heavy stone from the quarry on the hill.\n",
    "mars.md": "# Mars\n\nMars is the fourth planet from the sun and is often called the red planet because"
    " iron oxide on its dusty surface gives it a reddish colour that people can see from the earth.\n",
}
QUESTION = "What is the garden full of?"
SQUAD = {
    "data": [
        {
            "title": "Nature",
            "paragraphs": [
                {
                    "context": DOCS["garden.md"].split("\n\n")[1].strip(),
                    "qas": [{"id": "a", "question": QUESTION, "answers": [{"text": "red roses"}]}],
                },
                {
                    "context": DOCS["bridge.md"].split("\n\n")[1].strip(),
                    "qas": [
                        {"id": "b", "question": "When was the bridge built?", "answers": [{"text": "1850"}]}
                    ],
                },
                {
                    "context": DOCS["mars.md"].split("\n\n")[1].strip(),
                    "qas": [{"id": "c", "question": "Which planet is red?", "answers": [{"text": "Mars"}]}],
                },
            ],
        }
    ]
}


def run_json(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def run_err(argv: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 2, out.getvalue()
    return err.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    root = tmp_path_factory.mktemp("compress-cli")
    home = root / "home"
    src = root / "src"
    src.mkdir()
    for name, text in DOCS.items():
        (src / name).write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVRAG_HOME", str(home))
        mp.setenv("KVRAG_EMBEDDING_CACHE", "false")
        mp.setenv("KVRAG_GENERATOR", str(tiny_llama_dir))
        yield root, home, src


def index_argv(env, tiny_model_dir, collection: str, *extra: str) -> list[str]:
    root, _, src = env
    kv = (root / f"kv-{collection}").as_uri()
    return [
        "index",
        "--collection",
        collection,
        "--encoder",
        str(tiny_model_dir),
        "--kv-url",
        kv,
        "--json",
        *extra,
        str(src),
    ]


@pytest.fixture(scope="module")
def indexed(env, tiny_model_dir) -> dict:
    plain = run_json(index_argv(env, tiny_model_dir, "plain"))
    compressed = run_json(
        index_argv(env, tiny_model_dir, "small", "--compress", "selfinfo", "--compress-rate", "0.5")
    )
    return {"plain": plain, "small": compressed}


def rows_of(home: Path, name: str):
    collection = Collection.open(home, name)
    try:
        rows = collection.store.passages(collection.store.passage_ids())
        return sorted(rows, key=lambda r: r.doc_id), collection.store.compression()
    finally:
        collection.close()


def query(env, name: str, *extra: str, kv_of: str | None = None) -> dict:
    root, _, _ = env
    kv = (root / f"kv-{kv_of or name}").as_uri()
    return run_json(
        [
            "query",
            "--collection",
            name,
            "--kv-url",
            kv,
            "--k",
            "2",
            "--max-tokens",
            "4",
            "--json",
            *extra,
            QUESTION,
        ]
    )


def test_index_stores_compressed_texts_of_about_half_the_tokens(env, indexed, tiny_llama_dir) -> None:
    _, home, _ = env
    report = indexed["small"]
    assert "compression" not in indexed["plain"]
    c = report["compression"]
    assert (c["method"], c["rate"], c["compressed"], c["reused"]) == ("selfinfo", 0.5, 3, 0)
    assert c["passage_tokens_mean_compressed"] < c["passage_tokens_mean_original"]
    assert report["kv"]["kv_computed"] == 3

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    plain_rows, plain_record = rows_of(home, "plain")
    rows, record = rows_of(home, "small")
    assert plain_record is None and all(r.compressed is None for r in plain_rows)
    assert record == {"method": "selfinfo", "rate": 0.5, "source": str(tiny_llama_dir)}
    for r, p in zip(rows, plain_rows, strict=True):
        assert r.text == p.text  # the original text is kept as it was
        assert r.compressed and r.compressed != r.text
        n_orig = len(tok(r.text, add_special_tokens=False)["input_ids"])
        n_comp = len(tok(r.compressed, add_special_tokens=False)["input_ids"])
        assert 0.3 <= n_comp / n_orig <= 0.7, (n_comp, n_orig)
        # kept words come from the original, in order
        words = r.text.split()
        pos = 0
        for w in r.compressed.split():
            pos = words.index(w, pos) + 1


def test_kv_keys_are_those_of_the_compressed_texts(env, indexed, tiny_llama_dir) -> None:
    root, home, _ = env
    rows, _ = rows_of(home, "small")
    settings = get_settings()
    generator = open_generator(settings, str(tiny_llama_dir))
    for store_of, use_compressed, expected in (("small", True, True), ("small", False, False)):
        kv = open_kv(settings, generator, url=(root / f"kv-{store_of}").as_uri())
        try:
            keys = [
                kv.key(generator.passage_ids(passage_text(r, use_compressed), r.doc_title)).key for r in rows
            ]
            assert kv.store.exists_many(keys) == [expected] * len(rows)
        finally:
            kv.store.close()


def test_query_hits_the_compressed_caches_with_the_original_citations(env, indexed) -> None:
    small = query(env, "small")
    assert (small["kv"]["hits"], small["kv"]["misses"]) == (2, 0)
    plain = query(env, "plain")
    assert (plain["kv"]["hits"], plain["kv"]["misses"]) == (2, 0)
    # the compressed collection's caches are not the original texts' caches
    crossed = query(env, "small", kv_of="plain")
    assert crossed["kv"]["misses"] == 2

    def cites(answer: dict) -> list[tuple]:
        return [
            (c["passage_id"], c["doc_id"], c["title"], c["source"], c["score"]) for c in answer["citations"]
        ]

    assert cites(small) == cites(plain)
    assert {c["title"] for c in small["citations"]} <= {"Garden", "Bridge", "Mars"}
    # search results are the same as without compression (embeddings and BM25 on the original)
    for extra in ((), ("--hybrid",)):
        s = query(env, "small", "--search-only", *extra)["hits"]
        p = query(env, "plain", "--search-only", *extra)["hits"]
        assert [(h["passage_id"], h["doc_id"], h["text"], h["score"]) for h in s] == [
            (h["passage_id"], h["doc_id"], h["text"], h["score"]) for h in p
        ]
        assert all(h["compressed"] for h in s) and all(h["compressed"] is None for h in p)
        if not extra:
            assert [c["passage_id"] for c in small["citations"]] == [h["passage_id"] for h in s]


def test_reindex_reuses_or_redoes_the_compression(env, indexed, tiny_model_dir) -> None:
    _, home, _ = env
    before, _ = rows_of(home, "small")
    again = run_json(
        index_argv(env, tiny_model_dir, "small", "--compress", "selfinfo", "--compress-rate", "0.5")
    )
    assert (again["compression"]["compressed"], again["compression"]["reused"]) == (0, 3)
    assert (again["kv"]["kv_computed"], again["kv"]["kv_present"]) == (0, 3)
    # without --compress, the recorded settings are kept (and new passages would get them)
    kept = run_json(index_argv(env, tiny_model_dir, "small"))
    assert (kept["compression"]["method"], kept["compression"]["rate"]) == ("selfinfo", 0.5)
    assert (kept["compression"]["compressed"], kept["kv"]["kv_computed"]) == (0, 0)
    assert [r.compressed for r in rows_of(home, "small")[0]] == [r.compressed for r in before]
    # another rate: every passage is compressed again, and new caches are computed
    other = run_json(
        index_argv(env, tiny_model_dir, "small", "--compress", "selfinfo", "--compress-rate", "0.7")
    )
    assert other["compression"]["compressed"] == 3 and other["kv"]["kv_computed"] == 3
    rows, record = rows_of(home, "small")
    assert record["rate"] == 0.7
    assert sum(len(r.compressed) for r in rows) > sum(len(r.compressed) for r in before)
    # back to 0.5 for the other tests
    run_json(index_argv(env, tiny_model_dir, "small", "--compress", "selfinfo", "--compress-rate", "0.5"))


def test_index_compress_with_a_classifier_from_a_path(env, tiny_model_dir, tmp_path) -> None:
    from tests.compress.test_compress import KEEP_STRENGTH, build_classifier

    folder = build_classifier(tiny_model_dir, tmp_path / "classifier", KEEP_STRENGTH)
    report = run_json(
        index_argv(
            env,
            tiny_model_dir,
            "cls",
            "--no-kv",
            "--compress",
            "classifier",
            "--compress-rate",
            "0.5",
            "--compressor-path",
            str(folder),
        )
    )
    assert report["compression"]["method"] == "classifier" and report["compression"]["compressed"] == 3
    rows, record = rows_of(env[1], "cls")
    assert record == {"method": "classifier", "rate": 0.5, "source": str(folder.resolve())}
    assert all(r.compressed and len(r.compressed) < len(r.text) for r in rows)


def test_index_compress_errors(env, tiny_model_dir) -> None:
    err = run_err(index_argv(env, tiny_model_dir, "bad", "--compress-rate", "0.5"))
    assert "--compress" in err
    err = run_err(
        index_argv(
            env, tiny_model_dir, "bad", "--compress", "classifier", "--compressor-path", "/nonexistent"
        )
    )
    assert "/nonexistent" in err
    err = run_err(index_argv(env, tiny_model_dir, "bad", "--compress", "selfinfo", "--compress-rate", "1.5"))
    assert "rate" in err


def test_eval_rag_compress_reports_the_fields(env, tmp_path, tiny_model_dir, tiny_llama_dir) -> None:
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD), encoding="utf-8")
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
    plain = run_json(base)
    assert "compression" not in plain
    out = run_json([*base, "--compress", "selfinfo", "--compress-rate", "0.5"])
    c = out["compression"]
    assert (c["method"], c["rate"], c["compressed"]) == ("selfinfo", 0.5, 3)
    assert 0 < c["passage_tokens_mean_compressed"] < c["passage_tokens_mean_original"]
    assert out["kv_index"]["kv_computed"] == 3
    assert out["kv_counters"]["misses"] == 0 and out["kv_counters"]["hits"] == 3 * 2
    assert 0 < out["kv_blob_bytes_per_question_median"] < plain["kv_blob_bytes_per_question_median"]
    assert out["recall@2"] == plain["recall@2"]
    # the compressed texts are kept in the eval collection; a run without --compress ignores them
    again = run_json(base)
    assert "compression" not in again
    assert again["kv_blob_bytes_per_question_median"] == plain["kv_blob_bytes_per_question_median"]
    assert again["f1"] == plain["f1"] and again["gold_logprob"] == plain["gold_logprob"]
    reused = run_json([*base, "--compress", "selfinfo", "--compress-rate", "0.5"])
    assert reused["compression"]["compressed"] == 0 and reused["compression"]["reused"] == 3
    assert reused["kv_blob_bytes_per_question_median"] == out["kv_blob_bytes_per_question_median"]


OLD_SCHEMA = """
CREATE TABLE collections (name TEXT PRIMARY KEY, config TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE documents (
    id TEXT PRIMARY KEY, source TEXT, title TEXT, content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}', updated_at TEXT NOT NULL);
CREATE TABLE passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
    lang TEXT, kind TEXT NOT NULL CHECK (kind IN ('text', 'code')), title TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', content_hash TEXT NOT NULL);
INSERT INTO documents VALUES ('d1', 'a.md', 'A', 'h', '{}', 'now');
INSERT INTO passages (doc_id, ord, text, start, end, lang, kind, title, content_hash)
    VALUES ('d1', 0, 'one two three four', 0, 18, 'en', 'text', NULL, 'p');
"""


def test_schema_migration_adds_the_compressed_column(tmp_path) -> None:
    path = tmp_path / "passages.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.commit()
    db.close()

    store = PassageStore(path)
    try:
        columns = {r[1] for r in store.db.execute("PRAGMA table_info(passages)")}
        assert "compressed" in columns
        [row] = store.passages([1])
        assert row.text == "one two three four" and row.compressed is None
        assert store.compression() is None
        assert store.compressed_texts([1, 99]) == {1: None}
        report = store.compress_passages(
            lambda texts: [" ".join(t.split()[::2]) for t in texts], "selfinfo", 0.5
        )
        assert (report["compressed"], report["reused"]) == (1, 0)
        assert store.compressed_texts([1]) == {1: "one three"}
        assert store.passages([1])[0].text == "one two three four"
        # another rate drops the old compressed texts; clearing drops them and the record
        store.set_compression("selfinfo", 0.7)
        assert store.compressed_texts([1]) == {1: None}
        store.set_compressed({1: "two"})
        store.clear_compression()
        assert store.compression() is None and store.compressed_texts([1]) == {1: None}
    finally:
        store.close()
    # opening again (column present) changes nothing
    PassageStore(path).close()
