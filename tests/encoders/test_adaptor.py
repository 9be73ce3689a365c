"""Tests for encoders.adaptor (Matryoshka adaptors) and their use by VectorIndex and Collection.

Synthetic data with a known anisotropic covariance: a common offset (like the shared component of e5
embeddings) plus gaussian noise whose per-axis scales decay, in a random orthonormal basis, so plain
truncation keeps a poor share of the variance and PCA can recover the strong axes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from kvrag.encoders.adaptor import LearnedFit, MatryoshkaAdaptor, similarity_preservation
from kvrag.encoders.compress import normalize, truncate
from kvrag.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError, KvragError
from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.vector import MANIFEST, VectorIndex

D = 96


def anisotropic(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = 1.0 / (1.0 + np.arange(d)) ** 0.8
    offset = rng.standard_normal(d)
    return normalize(offset * 0.3 + (rng.standard_normal((n, d)) * scales) @ basis.T)


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return anisotropic(1500)


@pytest.fixture(scope="module")
def learned(corpus) -> MatryoshkaAdaptor:
    return MatryoshkaAdaptor.fit(
        corpus, "learned", learned=LearnedFit(dims=(96, 48, 24, 12), steps=100, batch=256)
    )


def kept_variance(y: np.ndarray, d: int) -> float:
    """Share of the total variance (about the mean) in the first d coordinates."""
    var = y.var(axis=0)
    return float(var[:d].sum() / var.sum())


def test_pca_orders_axes_by_variance_and_beats_plain_truncation(corpus):
    a = MatryoshkaAdaptor.fit(corpus, "pca")
    np.testing.assert_allclose(a.matrix.T @ a.matrix, np.eye(D), atol=1e-4)  # a rotation
    y = (corpus - a.mean) @ a.matrix
    var = y.var(axis=0)
    assert np.all(np.diff(var) <= 1e-7)  # decreasing variance
    for d in (8, 16, 32):
        assert kept_variance(y, d) >= kept_variance(corpus, d) + 0.1
        # and truncation keeps neighbourhoods better
        assert similarity_preservation(corpus, a, d) > similarity_preservation(corpus, None, d)


def test_learned_loss_goes_down_and_beats_pca_at_small_dims(corpus, learned):
    first, last = learned.info["losses"]
    assert last < first
    pca = MatryoshkaAdaptor.fit(corpus, "pca")
    held_out = _same_distribution(seed=1)
    assert similarity_preservation(held_out, learned, 12) >= similarity_preservation(held_out, pca, 12)
    assert similarity_preservation(held_out, learned, 24) >= similarity_preservation(held_out, pca, 24) - 0.02


def _same_distribution(seed: int) -> np.ndarray:
    """Fresh draws from the corpus's distribution (held out from the fit)."""
    rng = np.random.default_rng(0)  # the basis and offset of `anisotropic(seed=0)`
    basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
    scales = 1.0 / (1.0 + np.arange(D)) ** 0.8
    offset = rng.standard_normal(D)
    noise = np.random.default_rng(seed + 100).standard_normal((600, D))
    return normalize(offset * 0.3 + (noise * scales) @ basis.T)


def test_learned_fit_is_seeded(corpus):
    opts = LearnedFit(dims=(96, 24), steps=20, batch=256)
    a = MatryoshkaAdaptor.fit(corpus, "learned", learned=opts)
    b = MatryoshkaAdaptor.fit(corpus, "learned", learned=opts)
    np.testing.assert_array_equal(a.matrix, b.matrix)


def test_transform_is_normalise_centre_map_truncate(corpus, learned):
    x = corpus[:5] * 3.0  # not unit norm: the adaptor normalises first
    expected = truncate((normalize(x) - learned.mean) @ learned.matrix, 24)
    np.testing.assert_allclose(learned.transform(x, 24), expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(learned.transform(x, 24), axis=1), 1.0, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path, learned):
    learned.save(tmp_path)
    back = MatryoshkaAdaptor.load(tmp_path)
    assert back.method == "learned"
    np.testing.assert_array_equal(back.mean, learned.mean)
    np.testing.assert_array_equal(back.matrix, learned.matrix)
    assert back.matrix.dtype == np.float32
    data = json.loads((tmp_path / "adaptor.json").read_text())
    assert data["matrix"] == "adaptor.npy" and np.load(
        tmp_path / "adaptor.npy", allow_pickle=False
    ).shape == (D, D)


@pytest.mark.parametrize("spec", ["Flat", "SQ8", "BFlat"])
@pytest.mark.parametrize("method", ["pca", "learned"])
def test_index_applies_adaptor_to_documents_and_queries_alike(corpus, spec, method):
    dim = 32
    ids = np.arange(len(corpus)) * 7 + 1
    vi = VectorIndex(spec, dim, adaptor=method, input_dim=D, learned=LearnedFit(steps=20, batch=256))
    vi.add(ids, corpus)
    rng = np.random.default_rng(5)
    queries = normalize(corpus[:50] + 0.05 * rng.standard_normal((50, D)))
    scores, got = vi.search(queries, 10, rescore=4 if spec != "Flat" else 1)
    # brute force cosine on adapted + truncated vectors
    docs, qs = vi.adaptor.transform(corpus, dim), vi.adaptor.transform(queries, dim)
    brute = qs @ docs.T
    expected = ids[np.argsort(-brute, axis=1, kind="stable")[:, :10]]
    if spec == "Flat":
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(
            scores, np.take_along_axis(brute, np.argsort(-brute, axis=1)[:, :10], 1), atol=1e-5
        )
    else:  # compressed candidates, float rescoring: the best hit agrees nearly always
        assert np.mean(got[:, 0] == expected[:, 0]) >= 0.85  # 0.88 to 0.9+ measured (ITQ, 100 iterations)
    # a query given already truncated is refused, not silently compared
    with pytest.raises(DimensionMismatchError, match="adapted"):
        vi.search(truncate(queries, dim), 10)


def test_binary_itq_applies_after_the_adaptor(corpus):
    vi = VectorIndex("BFlat", 32, adaptor="pca", input_dim=D)
    vi.add(np.arange(len(corpus)), corpus)
    adapted = vi.adaptor.transform(corpus, 32)
    np.testing.assert_allclose(vi.binary.mean, adapted.mean(axis=0), atol=1e-5)
    assert vi.binary.rotation is not None and vi.binary.rotation.shape == (32, 32)
    np.testing.assert_allclose(vi.floats.array(), adapted, atol=1e-6)


def test_adaptor_survives_index_reload(tmp_path, corpus, learned):
    vi = VectorIndex("BFlat", 24, adaptor="pca", input_dim=D)
    vi.add(np.arange(len(corpus)), corpus)
    queries = corpus[::37]
    before = vi.search(queries, 5, rescore=3)
    vi.save(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["adaptor"]["method"] == "pca" and m["input_dim"] == D and m["dim"] == 24
    assert (tmp_path / m["adaptor"]["matrix"]).exists()
    loaded = VectorIndex.load(tmp_path)
    np.testing.assert_array_equal(loaded.adaptor.matrix, vi.adaptor.matrix)
    np.testing.assert_array_equal(loaded.adaptor.mean, vi.adaptor.mean)
    after = loaded.search(queries, 5, rescore=3)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # a second generation keeps the adaptor file, and old generations' files are cleaned up
    loaded.add([10_000], corpus[:1])
    loaded.save()
    m2 = json.loads((tmp_path / MANIFEST).read_text())
    assert (tmp_path / m2["adaptor"]["matrix"]).exists()
    np.testing.assert_array_equal(
        VectorIndex.load(tmp_path).search(queries, 5)[1], loaded.search(queries, 5)[1]
    )


def test_default_index_has_no_adaptor(tmp_path, corpus):
    vi = VectorIndex("Flat", D)
    vi.add(np.arange(100), corpus[:100])
    vi.save(tmp_path)
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["adaptor"] is None and m["input_dim"] == D
    assert not list(tmp_path.glob("adaptor*"))
    assert VectorIndex.load(tmp_path).adaptor is None


def test_collection_with_adaptor_survives_close_and_reopen(tmp_path, tiny_encoder):
    texts = [f"document {i} about {w}" for i, w in enumerate(["cats", "dogs", "rust", "python", "tea"] * 8)]
    cfg = CollectionConfig(encoder=tiny_encoder.name, spec="Flat", dim=16, adaptor="pca")
    col = Collection.create(tmp_path, "c", cfg)
    with pytest.raises(InvalidInputError, match="full embeddings"):
        col.ensure_index(16)
    index = col.ensure_index(16, input_dim=tiny_encoder.dim)
    assert index.input_dim == tiny_encoder.dim and index.dim == 16
    vecs = tiny_encoder.encode(texts, kind="passage", dim=index.input_dim)
    index.add(np.arange(len(texts)), vecs)
    col.commit()
    q = tiny_encoder.encode(["about tea"], kind="query", dim=index.input_dim)
    before = index.search(q, 5)
    col.close()
    again = Collection.open(tmp_path, "c")
    assert again.config.adaptor == "pca"
    after = again.index.search(q, 5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    again.close()


def test_bad_options_raise_clear_errors(corpus, tmp_path):
    with pytest.raises(InvalidInputError, match="unknown adaptor 'svd'"):
        MatryoshkaAdaptor.fit(corpus, "svd")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="nothing to fit"):
        MatryoshkaAdaptor.fit(corpus, "none")
    with pytest.raises(InvalidInputError, match="at least two"):
        MatryoshkaAdaptor.fit(corpus[:1], "pca")
    with pytest.raises(InvalidInputError, match="NaN"):
        MatryoshkaAdaptor.fit(np.full((4, D), np.nan), "pca")
    a = MatryoshkaAdaptor.fit(corpus, "pca")
    with pytest.raises(DimensionMismatchError, match="full"):
        a.transform(corpus[:, :32])
    with pytest.raises(DimensionMismatchError):
        a.transform(corpus, D + 1)
    with pytest.raises(InvalidInputError, match="unknown adaptor"):
        VectorIndex("Flat", 32, adaptor="zca")
    with pytest.raises(DimensionMismatchError, match="cannot truncate"):
        VectorIndex("Flat", 64, adaptor="pca", input_dim=32)
    with pytest.raises(InvalidInputError, match="unknown adaptor"):
        Collection.create(tmp_path, "bad", CollectionConfig(adaptor="PCA"))
    with pytest.raises(CorruptIndexError):
        MatryoshkaAdaptor.load(tmp_path / "missing")
    with pytest.raises(InvalidInputError, match="dim_weights"):
        MatryoshkaAdaptor.fit(corpus, "learned", learned=LearnedFit(dims=(96, 12), dim_weights=(1.0,)))
    # an empty adaptor index answers nothing rather than failing
    s, i = VectorIndex("Flat", 32, adaptor="pca", input_dim=D).search(corpus[:2], 3)
    assert (i == -1).all()


def test_cli_rotation_and_binary_method_must_agree(monkeypatch):
    from kvrag.service import cli

    seen = {}

    def fake_run(cfg, enc_cfg, show_progress=False):
        seen["cfg"] = cfg
        return {"ok": 1}

    monkeypatch.setattr("kvrag.rag.eval.retrieval.run_retrieval_eval", fake_run)
    args = cli.build_parser().parse_args(["eval", "retrieval", "--data", ".", "--rotation", "none"])
    assert (args.rotation, args.binary_method, args.adaptor) == ("none", None, "none")
    base = dict(
        data=".",
        corpus=None,
        precision="ubinary",
        spec=None,
        dim=None,
        rescore=1,
        rescore_with="float32",
        hybrid=False,
        bm25_language=None,
        limit=None,
        json=True,
        encoder=None,
        adaptor="learned",
        no_pseudo_queries=False,
    )
    with pytest.raises(KvragError, match="--rotation none means --binary-method mean"):
        cli.cmd_eval_retrieval(argparse.Namespace(**base, rotation="none", binary_method="itq"))
    cli.cmd_eval_retrieval(argparse.Namespace(**base, rotation="none", binary_method=None))
    assert seen["cfg"].binary_method == "mean" and seen["cfg"].adaptor == "learned"
    cli.cmd_eval_retrieval(argparse.Namespace(**base, rotation=None, binary_method=None))
    assert seen["cfg"].binary_method == "itq"
    cli.cmd_eval_retrieval(argparse.Namespace(**base, rotation="itq", binary_method="itq"))
    assert seen["cfg"].binary_method == "itq" and seen["cfg"].pseudo_queries is True
    args = cli.build_parser().parse_args(["eval", "retrieval", "--data", ".", "--no-pseudo-queries"])
    cli.cmd_eval_retrieval(args)
    assert seen["cfg"].pseudo_queries is False


# -- pseudo-query pairs ------------------------------------------------------------------------


def _pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, passages) where what ties a query to its passage lives on the passages' weakest axes:
    a map fitted on passages alone puts those axes last, so truncation drops exactly what matters."""
    rng = np.random.default_rng(0)  # one fixed geometry for every draw
    basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
    scales = 1.0 / (1.0 + np.arange(D)) ** 0.8
    q_offset = rng.standard_normal(D)
    draw = np.random.default_rng(seed + 200)
    z = draw.standard_normal((n, D)) * scales
    passages = normalize(z @ basis.T)
    weak = np.zeros(D)
    weak[24:40] = 4.0  # queries repeat 16 of the passage's weaker coordinates, strongly
    queries = normalize(q_offset * 0.2 + (z * weak + 0.02 * draw.standard_normal((n, D))) @ basis.T)
    return queries, passages


def _recall_at_1(adaptor: MatryoshkaAdaptor, queries: np.ndarray, passages: np.ndarray, dim: int) -> float:
    sims = adaptor.transform(queries, dim) @ adaptor.transform(passages, dim).T
    return float(np.mean(sims.argmax(axis=1) == np.arange(len(queries))))


def test_pseudo_query_is_title_else_first_sentence():
    from kvrag.encoders.adaptor import pseudo_query

    assert pseudo_query("Body text. More.", "  A title ") == "A title"
    assert pseudo_query("Cats purr when content. They also knead.") == "Cats purr when content."
    assert pseudo_query("def area(r):\n    return 3.14 * r * r\n") == "def area(r):"
    assert pseudo_query(" ".join(f"w{i}" for i in range(100)), max_words=5) == "w0 w1 w2 w3 w4"
    assert pseudo_query("   ") == ""


def test_pseudo_queries_suit_prose_not_code():
    from kvrag.encoders.adaptor import pseudo_queries_suit
    from kvrag.encoders.codetext import defines_code

    code = 'def load(path):\n    """Read a JSON file."""\n    return 1\n'
    fragment = "import os\n\nclass LRUCache(dict):\n    size = 3"
    prose = "Class action suits are common. The def of a word is its meaning."
    assert defines_code(code) and defines_code(fragment) and not defines_code(prose)
    assert pseudo_queries_suit([prose, prose, code])
    assert not pseudo_queries_suit([prose, code, fragment])
    # stated kinds win over the text
    assert pseudo_queries_suit([code, code], ["text", "text"])
    assert not pseudo_queries_suit([prose, prose, prose], ["code", "code", None])
    assert pseudo_queries_suit([])
    with pytest.raises(InvalidInputError, match="kinds"):
        pseudo_queries_suit([prose], ["text", "code"])


def test_pairs_teach_the_map_what_queries_need():
    queries, passages = _pairs(1200, seed=0)
    pca_docs = MatryoshkaAdaptor.fit(passages, "pca")
    learned = MatryoshkaAdaptor.fit(
        passages, "learned", queries=queries, learned=LearnedFit(dims=(96, 48, 24, 12), steps=150, batch=256)
    )
    assert learned.info["pseudo_queries"] == 1200 and learned.info["objective"] == "pseudo-query ranking"
    first, last = learned.info["losses"]
    assert last < first
    test_q, test_p = _pairs(300, seed=1)  # fresh pairs: the map generalises, it did not memorise
    for dim, margin in ((24, 0.3), (16, 0.1)):  # measured: 0.54 against 0.01, 0.19 against 0.0
        assert (
            _recall_at_1(learned, test_q, test_p, dim) >= _recall_at_1(pca_docs, test_q, test_p, dim) + margin
        )
    # the pca adaptor also centres on, and orders axes by, passages and queries together
    pca_both = MatryoshkaAdaptor.fit(passages, "pca", queries=queries)
    np.testing.assert_allclose(pca_both.mean, np.concatenate([passages, queries]).mean(axis=0), atol=1e-6)
    assert not np.allclose(pca_both.matrix, pca_docs.matrix, atol=1e-3)


def test_pseudo_queries_must_pair_row_for_row(corpus):
    with pytest.raises(InvalidInputError, match="row for row"):
        MatryoshkaAdaptor.fit(corpus, "pca", queries=corpus[:10])
    with pytest.raises(InvalidInputError, match="NaN"):
        MatryoshkaAdaptor.fit(corpus[:10], "pca", queries=np.full((10, D), np.nan, dtype=np.float32))
    vi = VectorIndex("Flat", 32, adaptor="pca", input_dim=D)
    with pytest.raises(InvalidInputError, match="row for row"):
        vi.add(np.arange(len(corpus)), corpus, fit_queries=corpus[:5])


def test_index_calibrates_adaptor_and_binary_codes_on_pseudo_queries():
    queries, passages = _pairs(800, seed=0)
    with_q = VectorIndex("BFlat", 24, adaptor="learned", input_dim=D, learned=LearnedFit(steps=60, batch=256))
    with_q.add(np.arange(800), passages, fit_queries=queries)
    without = VectorIndex(
        "BFlat", 24, adaptor="learned", input_dim=D, learned=LearnedFit(steps=60, batch=256)
    )
    without.add(np.arange(800), passages)
    assert with_q.adaptor.info["pseudo_queries"] == 800 and without.adaptor.info["pseudo_queries"] == 0
    both = np.concatenate([with_q.adaptor.transform(passages, 24), with_q.adaptor.transform(queries, 24)])
    np.testing.assert_allclose(with_q.binary.mean, both.mean(axis=0), atol=1e-5)
    # the pseudo-queries only calibrate: they are not stored, and later adds ignore them
    assert with_q.ntotal == 800
    matrix = with_q.adaptor.matrix.copy()
    with_q.add([5000], passages[:1], fit_queries=queries[:1])
    np.testing.assert_array_equal(with_q.adaptor.matrix, matrix)
    # and no adaptor: binary centring still sees the queries
    plain = VectorIndex("BFlat", D)
    plain.add(np.arange(800), passages, fit_queries=queries)
    np.testing.assert_allclose(plain.binary.mean, np.concatenate([passages, queries]).mean(axis=0), atol=1e-5)
