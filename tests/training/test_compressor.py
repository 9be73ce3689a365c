"""Distilling the compressor (`training.compressor`) on the tiny random BERT encoder and the tiny random
Llama teacher, and the package rebuilding the trained checkpoint from its delta (`rag.compress.bundled`)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.compress import bundled
from kvrag.rag.compress.base import split_words
from training.compressor import (
    TEACHER_RATES,
    TopLayers,
    TrainConfig,
    _cached_labels,
    _save_labels,
    frozen_features,
    load_passages,
    soft_labels,
    token_targets,
    train_compressor,
    truncate_to_tokens,
)

EN_TEXTS = [
    "Vitamin D deficiency is associated with increased risk of fractures in elderly patients.",
    "The quick brown fox jumps over the lazy dog while the unbelievably sleepy cat watches.",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose and oxygen.",
    "Researchers measured interleukin-6 concentrations in 1,234 participants over 3.5 years.",
    "Madrid es la capital de España y tiene más de tres millones de habitantes.",
    "El río Amazonas atraviesa varios países de América del Sur antes de llegar al océano.",
]
ZH_TEXTS = [
    "北京是中国的首都,也是一个历史悠久的城市。",
    "长江是亚洲最长的河流,流经许多省份。",
    "上海位于长江入海口,是重要的经济中心。",
    "黄河被称为中华民族的母亲河。",
]


def words_of(text: str) -> list[str]:
    return [text[w.start : w.end] for w in split_words(text)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def one_thread():
    """Bit-for-bit reproducibility is promised for a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- soft labels


def test_soft_labels_empty():
    assert soft_labels([], []) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_labels_range_top_word_and_monotone(seed):
    rng = random.Random(seed)
    n = 25
    scores = [rng.random() for _ in range(n)]
    counts = [rng.randint(1, 4) for _ in range(n)] if seed else [1] * n
    labels = soft_labels(scores, counts)
    assert len(labels) == n
    assert all(0.0 <= x <= 1.0 for x in labels)
    # One keep decision per rate: every label is a multiple of 1/9.
    assert all(abs(x * len(TEACHER_RATES) - round(x * len(TEACHER_RATES))) < 1e-9 for x in labels)
    top = max(range(n), key=lambda i: scores[i])
    assert labels[top] == max(labels) == 1.0  # kept at every rate
    assert min(labels) < 1.0  # something is dropped at rate 0.1
    for i in range(n):
        for j in range(n):
            if scores[i] > scores[j]:
                assert labels[i] >= labels[j], (i, j, scores[i], scores[j], labels[i], labels[j])


def test_soft_labels_follow_the_rates():
    # 10 one-token words with decreasing scores: at rate r the first 10*r words are kept, so word k
    # is kept at the rates 0.(k+1) ... 0.9.
    scores = [10.0 - i for i in range(10)]
    labels = soft_labels(scores, [1] * 10)
    assert labels == pytest.approx([(9 - k) / 9 if k else 1.0 for k in range(10)])
    assert labels[-1] == 0.0 and labels[1] == pytest.approx(8 / 9)
    # The label order follows the score order, not the word position.
    assert soft_labels(scores[::-1], [1] * 10) == pytest.approx(labels[::-1])


# ---------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("limit", [3, 5, 8, 12])
def test_truncate_cuts_at_a_word_end_within_the_limit(tokenizer, limit):
    texts = EN_TEXTS + ZH_TEXTS
    out = truncate_to_tokens(texts, tokenizer, limit)
    assert len(out) == len(texts)
    for text, cut in zip(texts, out, strict=True):
        n_tokens = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
        assert n_tokens <= limit, (cut, n_tokens)
        assert text.startswith(cut)
        assert cut.strip(), "something is kept"
        # Ends at a word end: the cut's words are a prefix of the text's words, the last one whole.
        ends = {w.end for w in split_words(text)}
        assert len(cut) in ends, (text, cut)
        assert words_of(cut) == words_of(text)[: len(words_of(cut))]
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > limit:
            assert len(cut) < len(text)
            # Not cut shorter than needed: one more word would not fit.
            nxt = [w.end for w in split_words(text) if w.end > len(cut)][0]
            assert len(tokenizer(text[:nxt], add_special_tokens=False)["input_ids"]) > limit


def test_truncate_leaves_short_texts_alone(tokenizer):
    texts = ["Short text.", "北京是首都。", "  spaced   words  "]
    assert truncate_to_tokens(texts, tokenizer, 64) == texts
    long = EN_TEXTS[1]
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert truncate_to_tokens([long], tokenizer, n) == [long]  # exactly at the limit
    assert truncate_to_tokens([long], tokenizer, n - 1) != [long]


def test_truncate_never_halves_a_multi_token_word(tokenizer):
    text = "alpha unbelievably beta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # "unbelievably" is several word pieces
    for limit in range(2, len(ids)):
        (cut,) = truncate_to_tokens([text], tokenizer, limit)
        assert cut in ("alpha", "alpha unbelievably"), (limit, cut)


# ---------------------------------------------------------------------------- passages


def squad(paragraphs: list[str], title: str = "T") -> dict:
    return {"data": [{"title": title, "paragraphs": [{"context": p, "qas": []} for p in paragraphs]}]}


def make_data(root: Path, n_para: int = 10, scifact: list[str] | None = None) -> Path:
    (root / "scifact").mkdir(parents=True, exist_ok=True)
    rows = (
        scifact
        if scifact is not None
        else [f"Abstract number {i} about cells and proteins." for i in range(8)]
    )
    with (root / "scifact" / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for i, text in enumerate(rows):
            fh.write(json.dumps({"_id": str(i), "title": f"Title {i}", "text": text}) + "\n")
    (root / "xquad").mkdir(exist_ok=True)
    es = [f"El párrafo número {i} habla de la historia de la ciudad y sus habitantes." for i in range(n_para)]
    zh = [f"第{i}段讲述了这座城市的历史和居民。" for i in range(n_para)]
    de = [f"Absatz {i} erzählt die Geschichte der Stadt." for i in range(n_para)]
    # Two articles, so the paragraph list is flattened across articles.
    for lang, paras in (("es", es), ("zh", zh), ("de", de)):
        data = squad(paras[: n_para // 2], "A")
        data["data"] += squad(paras[n_para // 2 :], "B")["data"]
        (root / "xquad" / f"xquad.{lang}.json").write_text(
            json.dumps(data, ensure_ascii=False), encoding="utf-8"
        )
    return root


def test_load_passages_scifact_limit_and_order(tmp_path):
    data = make_data(tmp_path, scifact=["first", "", "second", "third", "fourth"])
    got = load_passages(data, 3, [], 5)
    assert got == [("scifact", "first"), ("scifact", "second"), ("scifact", "third")]  # empty rows skipped
    assert len(load_passages(data, 100, [], 5)) == 4
    assert all(s != "scifact" for s, _ in load_passages(data, 0, ["es"], 2))


def test_load_passages_samples_per_language(tmp_path):
    data = make_data(tmp_path, n_para=10)
    got = load_passages(data, 2, ["es", "zh"], per_lang=3, seed=0)
    sources = [s for s, _ in got]
    assert sources == ["scifact"] * 2 + ["xquad-es"] * 3 + ["xquad-zh"] * 3
    all_es = json.loads((data / "xquad" / "xquad.es.json").read_text(encoding="utf-8"))
    all_es = [p["context"] for a in all_es["data"] for p in a["paragraphs"]]
    es = [t for s, t in got if s == "xquad-es"]
    assert len(set(es)) == 3 and set(es) <= set(all_es)
    assert es == sorted(es, key=all_es.index)  # the sample keeps the file order
    # Reproducible for a seed; other seeds draw other samples.
    assert load_passages(data, 2, ["es", "zh"], per_lang=3, seed=0) == got
    draws = {tuple(load_passages(data, 0, ["es"], per_lang=3, seed=s)) for s in range(6)}
    assert len(draws) > 1
    # A sample as large as the language takes every paragraph, in order.
    full = load_passages(data, 0, ["zh"], per_lang=50)
    assert len(full) == 10 and [t for _, t in full] == [
        f"第{i}段讲述了这座城市的历史和居民。" for i in range(10)
    ]


def test_load_passages_only_listed_languages(tmp_path):
    data = make_data(tmp_path)
    got = load_passages(data, 0, ["zh"], per_lang=4)
    assert {s for s, _ in got} == {"xquad-zh"}
    assert len(got) == 4


def test_load_passages_errors(tmp_path):
    data = make_data(tmp_path)
    with pytest.raises(InvalidInputError, match="unknown XQuAD language"):
        load_passages(data, 1, ["fr"], 2)
    with pytest.raises(InvalidInputError, match="xquad.ru.json"):
        load_passages(data, 1, ["ru"], 2)  # a known language without its file
    with pytest.raises(InvalidInputError, match="no training passages"):
        load_passages(data, 0, [], 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="corpus.jsonl"):
        load_passages(empty, 5, [], 2)
    # No SciFact file is needed when no abstracts are asked for.
    assert {s for s, _ in load_passages(data, 0, ["es"], 2)} == {"xquad-es"}
    with pytest.raises(InvalidInputError):
        load_passages(empty, 0, ["es"], 2)


# ---------------------------------------------------------------------------- token targets


# Han characters the MiniLM vocabulary knows (others become [UNK], see the test below).
ZH_IN_VOCAB = "中国的北京城,一年。我上学,大山小河。"


def test_token_targets_map_tokens_to_their_word_labels(tokenizer):
    texts = [EN_TEXTS[1], EN_TEXTS[3], ZH_IN_VOCAB, "我上Python学 since 2019年, ok"]
    labels = [[(w + 1) / 1000 for w in range(len(split_words(t)))] for t in texts]
    rows = token_targets(texts, labels, tokenizer, max_length=128)
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    assert len(rows) == len(texts)
    for text, lab, (ids, target), ref_ids, offsets in zip(
        texts, labels, rows, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        words = split_words(text)
        assert ids == ref_ids
        assert tokenizer.unk_token_id not in ids
        assert len(target) == len(ids)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert target[0] == -1.0 and target[-1] == -1.0
        seen = set()
        for tid, (s, e), t in zip(ids[1:-1], offsets[1:-1], target[1:-1], strict=True):
            assert e > s, tokenizer.convert_ids_to_tokens(tid)
            owner = [k for k, w in enumerate(words) if w.start <= s < w.end]
            assert len(owner) == 1
            assert t == lab[owner[0]], (text, text[s:e], t)
            seen.add(owner[0])
        assert seen == set(range(len(words)))  # every word has a token
    zh_target = rows[2][1][1:-1]
    assert zh_target == labels[2]  # one token per Han character (and per punctuation mark)
    assert len(labels[2]) == len(ZH_IN_VOCAB)
    mixed = rows[3][1][1:-1]
    assert mixed[:4] == [labels[3][0], labels[3][1], labels[3][2], labels[3][3]]  # 我 上 python 学


def test_token_targets_unknown_token_gets_its_word_label(tokenizer):
    text = "北京是首都"  # 是 and 首 are [UNK] for the MiniLM vocabulary
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id in ids
    labels = [[0.1, 0.2, 0.3, 0.4, 0.5]]
    [(_, target)] = token_targets([text], labels, tokenizer, max_length=32)
    assert target == [-1.0, 0.1, 0.2, 0.3, 0.4, 0.5, -1.0]


def test_token_targets_truncation_keeps_the_special_tokens(tokenizer):
    text = EN_TEXTS[0]
    labels = [[0.5] * len(split_words(text))]
    [(ids, target)] = token_targets([text], labels, tokenizer, max_length=6)
    assert len(ids) == 6 and ids[-1] == tokenizer.sep_token_id
    assert target[0] == target[-1] == -1.0
    assert target[1:-1] == [0.5] * 4


# ---------------------------------------------------------------------------- label cache


def test_label_cache_roundtrip_and_invalidation(tmp_path):
    path = tmp_path / "teacher-labels.jsonl"
    texts = [EN_TEXTS[0], ZH_TEXTS[1], EN_TEXTS[4]]
    labels = [[(i * 7 + j) % 10 / 9 for j in range(len(split_words(t)))] for i, t in enumerate(texts)]
    assert _cached_labels(path, texts, "teacher-a") is None  # no file yet
    _save_labels(path, texts, labels, "teacher-a")
    got = _cached_labels(path, texts, "teacher-a")
    assert got is not None and len(got) == len(labels)
    for g, lab in zip(got, labels, strict=True):
        assert g == pytest.approx(lab, abs=1e-4)
    # A subset, in another order, is found too.
    sub = _cached_labels(path, [texts[2], texts[0]], "teacher-a")
    assert sub is not None and sub[0] == pytest.approx(labels[2], abs=1e-4)
    assert _cached_labels(path, texts, "teacher-b") is None
    assert _cached_labels(path, [texts[0] + " more", texts[1], texts[2]], "teacher-a") is None
    assert _cached_labels(path, texts[:2] + [texts[2].replace("Madrid", "Sevilla")], "teacher-a") is None
    # Labels that do not fit the text's words (e.g. a changed word rule) are not used.
    _save_labels(path, texts, [lab[:-1] for lab in labels], "teacher-a")
    assert _cached_labels(path, texts, "teacher-a") is None
    path.write_text("not json\n", encoding="utf-8")
    assert _cached_labels(path, texts, "teacher-a") is None
    assert not path.with_suffix(".tmp").exists()


# ---------------------------------------------------------------------------- frozen features + top layers


@pytest.fixture(scope="module")
def token_model(tiny_model_dir):
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(1)
        model = AutoModelForTokenClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    finally:
        hf_logging.set_verbosity(verbosity)
    # A visible head, so the logits differ between tokens.
    torch.nn.init.normal_(model.classifier.weight, std=0.2)
    torch.nn.init.normal_(model.classifier.bias, std=0.2)
    return model.eval()


@pytest.mark.parametrize("n_top", [0, 1, 2])
def test_top_layers_over_frozen_features_match_the_full_model(token_model, tokenizer, n_top):
    model = token_model
    texts = [EN_TEXTS[2], "Short one.", ZH_TEXTS[3], EN_TEXTS[1]]
    rows = [(ids, [0.0] * len(ids)) for ids in tokenizer(texts)["input_ids"]]
    assert len({len(r[0]) for r in rows}) == len(rows)  # all lengths differ
    start = len(model.base_model.encoder.layer) - n_top
    feats = frozen_features(model, rows, start, batch=3)
    assert [f.shape[0] for f in feats] == [len(r[0]) for r in rows]
    assert all(f.dtype == torch.float16 for f in feats)
    top = TopLayers(model, n_top).eval()
    assert top.start == start and len(top.layers) == n_top
    with torch.inference_mode():
        full = [model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in rows]
        # The logits vary far more than the tolerance (fp16 features), so a wrong layer or mask shows.
        assert torch.cat(full).std() > 0.1
        # One row at a time.
        for f, ref in zip(feats, full, strict=True):
            got = top(f.float()[None], torch.ones(1, f.shape[0], dtype=torch.long))[0]
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)
        # A padded batch, built as train_compressor builds it.
        longest = max(f.shape[0] for f in feats)
        hidden = torch.zeros(len(feats), longest, feats[0].shape[-1])
        mask = torch.zeros(len(feats), longest, dtype=torch.long)
        for j, f in enumerate(feats):
            hidden[j, : f.shape[0]] = f.float()
            mask[j, : f.shape[0]] = 1
        batch = top(hidden, mask)
        for j, ref in enumerate(full):
            torch.testing.assert_close(batch[j, : ref.shape[0]], ref, atol=2e-3, rtol=0)
    # The head is shared with the model, not copied (training it trains the saved checkpoint).
    assert top.classifier is model.classifier
    if n_top:
        assert top.layers[-1] is model.base_model.encoder.layer[-1]


# ---------------------------------------------------------------------------- end to end


def tiny_config(data: Path, out: Path, encoder: Path, teacher: Path, **kw) -> TrainConfig:
    base = dict(
        data_dir=data,
        out=out,
        encoder=str(encoder),
        teacher=str(teacher),
        scifact=6,
        langs=("es", "zh"),
        per_lang=3,
        max_length=48,
        train_layers=1,
        epochs=1,
        batch_size=4,
        heldout=0.2,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    """One small training run (its folder, report and log), with a models folder of its own."""
    root = tmp_path_factory.mktemp("train")
    data = make_data(root / "data", scifact=[t * 3 for t in EN_TEXTS])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    messages: list[str] = []
    try:
        report = train_compressor(
            tiny_config(data, root / "out", tiny_model_dir, tiny_llama_dir),
            models_dir=root / "models",
            log=lambda *a: messages.append(" ".join(map(str, a))),
        )
    finally:
        torch.set_num_threads(before)
    return {"root": root, "data": data, "out": root / "out", "report": report, "log": messages}


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_report_and_files(trained, tiny_model_dir):
    from transformers import BertForTokenClassification

    out, report = trained["out"], trained["report"]
    assert set(report) >= {
        "config",
        "passages",
        "tokens",
        "final_loss",
        "heldout_agreement",
        "random_overlap@0.5",
        "trained_parameters",
        "delta_bytes",
        "seconds",
        "torch",
        "threads",
    }
    assert report["passages"]["train"] + report["passages"]["heldout"] == 12
    assert report["passages"]["heldout"] == 2
    assert report["passages"]["by_source"] == {"scifact": 6, "xquad-es": 3, "xquad-zh": 3}
    assert report["config"]["train_layers"] == 1 and "data_dir" not in report["config"]
    assert set(report["heldout_agreement"]) == {"kept_overlap@0.5", "pearson"}
    assert 0.0 <= report["heldout_agreement"]["kept_overlap@0.5"] <= 1.0
    assert report["final_loss"] > 0 and report["threads"] == 1
    assert any("12 passages" in m for m in trained["log"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "delta.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "teacher-labels.jsonl").is_file()
    # recipe.json is the report (as JSON: the tuple of languages reads back as a list).
    recipe = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    assert recipe == json.loads(json.dumps(report))
    assert report["delta_bytes"] == (out / "delta.safetensors").stat().st_size

    delta = load_delta(out / "delta.safetensors")
    names = [n for n, _ in BertForTokenClassification.from_pretrained(str(out)).named_parameters()]
    expected = {n for n in names if n.startswith(("bert.encoder.layer.1.", "classifier."))}
    assert set(delta) == expected
    assert "classifier.weight" in delta and delta["classifier.weight"].shape == (2, 32)
    assert all(t.dtype == torch.float16 for t in delta.values())
    assert report["trained_parameters"] == sum(t.numel() for t in delta.values())
    # The full checkpoint holds the trained tensors.
    model = BertForTokenClassification.from_pretrained(str(out))
    params = dict(model.named_parameters())
    for name, value in delta.items():
        torch.testing.assert_close(params[name].detach().half(), value, atol=0, rtol=0)
    # The frozen layers are the encoder's, untouched.
    base = BertForTokenClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    base_params = dict(base.named_parameters())
    for name in names:
        if name.startswith("bert.encoder.layer.0.") or name.startswith("bert.embeddings."):
            assert torch.equal(params[name], base_params[name]), name
    assert model.config.id2label == {0: "drop", 1: "keep"}


def test_trained_folder_loads_as_a_classifier_compressor(trained):
    from kvrag.rag.compress import ClassifierCompressor

    comp = ClassifierCompressor(trained["out"])
    text = EN_TEXTS[1] + " " + EN_TEXTS[2]
    [short] = comp.compress([text], rate=0.5)
    assert 0 < len(words_of(short)) < len(words_of(text))
    assert all(w in words_of(text) for w in words_of(short))


def test_training_is_reproducible_and_reuses_teacher_labels(
    trained, tiny_model_dir, tiny_llama_dir, monkeypatch, one_thread
):
    root = trained["root"]
    first = load_delta(trained["out"] / "delta.safetensors")
    log2: list[str] = []
    report2 = train_compressor(
        tiny_config(trained["data"], root / "out2", tiny_model_dir, tiny_llama_dir),
        models_dir=root / "models",
        log=lambda *a: log2.append(" ".join(map(str, a))),
    )
    assert not any("reused" in m for m in log2)  # a new folder: the teacher ran again
    second = load_delta(root / "out2" / "delta.safetensors")
    assert set(second) == set(first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert report2["final_loss"] == trained["report"]["final_loss"]
    assert report2["heldout_agreement"] == trained["report"]["heldout_agreement"]
    # Same texts and teacher in a folder that has their labels: the teacher is not run.
    from kvrag.rag.generation import generator as generator_module

    class NoTeacher:
        def __init__(self, *a, **kw):
            raise AssertionError("the teacher must not be loaded when its labels are cached")

    monkeypatch.setattr(generator_module, "Generator", NoTeacher)
    log3: list[str] = []
    train_compressor(
        tiny_config(trained["data"], root / "out2", tiny_model_dir, tiny_llama_dir),
        models_dir=root / "models",
        log=lambda *a: log3.append(" ".join(map(str, a))),
    )
    assert any("reused" in m for m in log3), log3


def test_rerun_with_cached_labels_is_bit_identical(trained, tiny_model_dir, tiny_llama_dir, one_thread):
    root = trained["root"]
    first = load_delta(trained["out"] / "delta.safetensors")
    out3 = root / "out3"
    out3.mkdir()
    shutil.copy(trained["out"] / "teacher-labels.jsonl", out3 / "teacher-labels.jsonl")
    log3: list[str] = []
    train_compressor(
        tiny_config(trained["data"], out3, tiny_model_dir, tiny_llama_dir),
        models_dir=root / "models",
        log=lambda *a: log3.append(" ".join(map(str, a))),
    )
    assert any("reused" in m for m in log3)
    third = load_delta(out3 / "delta.safetensors")
    assert all(torch.equal(first[n], third[n]) for n in first)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(train_layers=-1), "train-layers"),
        (dict(train_layers=3), "train-layers"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch-size"),
        (dict(heldout=0.0), "heldout"),
        (dict(heldout=0.5), "heldout"),
    ],
)
def test_train_rejects_bad_settings(trained, tiny_model_dir, tiny_llama_dir, bad, match):
    root = trained["root"]
    # The labels are cached in the trained folder's copy, so a bad value is caught without the teacher.
    out = root / f"bad-{next(iter(bad))}-{next(iter(bad.values()))}"
    out.mkdir()
    shutil.copy(trained["out"] / "teacher-labels.jsonl", out / "teacher-labels.jsonl")
    with pytest.raises(InvalidInputError, match=match):
        train_compressor(
            tiny_config(trained["data"], out, tiny_model_dir, tiny_llama_dir, **bad),
            models_dir=root / "models",
            log=lambda *a: None,
        )
    assert not (out / "delta.safetensors").exists()


# ---------------------------------------------------------------------------- bundled rebuild


def logits_of(folder: Path, tokenizer, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(folder)).eval()
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits


def test_build_classifier_folder_matches_the_trained_checkpoint(trained, tiny_model_dir, tokenizer, tmp_path):
    dest = tmp_path / "models" / "rebuilt"
    got = bundled.build_classifier_folder(dest, tiny_model_dir, trained["out"] / "delta.safetensors")
    assert got == dest and (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    marker = json.loads((dest / "kvrag-delta.json").read_text(encoding="utf-8"))
    assert marker["delta_sha256_16"] == bundled.delta_digest(trained["out"] / "delta.safetensors")
    assert [p.name for p in dest.parent.iterdir()] == ["rebuilt"]  # no temporary folder left behind
    texts = [EN_TEXTS[0], ZH_TEXTS[2]]
    want = logits_of(trained["out"], tokenizer, texts)
    rebuilt = logits_of(dest, tokenizer, texts)
    torch.testing.assert_close(rebuilt, want, atol=1e-2, rtol=1e-2)
    # Loads as a compressor, with the keep/drop labels.
    from kvrag.rag.compress import ClassifierCompressor

    assert ClassifierCompressor(dest).model.config.id2label == {0: "drop", 1: "keep"}
