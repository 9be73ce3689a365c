"""Prompt compression: word splitting, rate handling, forced words, and both methods on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from kvrag.errors import InvalidInputError, ModelNotFoundError
from kvrag.rag.compress import (
    ClassifierCompressor,
    PromptCompressor,
    SelfInfoCompressor,
    WordScores,
    check_rate,
    open_compressor,
    select_words,
    split_words,
)


def words_of(text: str) -> list[str]:
    return [text[w.start : w.end] for w in split_words(text)]


class LengthCompressor(PromptCompressor):
    """Scores a word by its length; one token per character (so token counts are easy to check)."""

    def score_words(self, texts, words):
        return [
            WordScores([float(w.end - w.start) for w in ws], [w.end - w.start for w in ws]) for ws in words
        ]


def is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(s == b for b in it) for s in small)


# ---------------------------------------------------------------------------- word splitting


def test_split_english_keeps_punctuation_on_words():
    assert words_of("Hello, world! It's 3.5 km.") == ["Hello,", "world!", "It's", "3.5", "km."]


def test_split_german():
    text = "Die Straßenbahn fährt um 8 Uhr über die Brücke."
    assert words_of(text) == ["Die", "Straßenbahn", "fährt", "um", "8", "Uhr", "über", "die", "Brücke."]


def test_split_chinese_each_character_is_a_word():
    assert words_of("北京是中国的首都。") == ["北", "京", "是", "中", "国", "的", "首", "都", "。"]


def test_split_mixed_scripts_and_unicode_spaces():
    text = "我用Python编程\u3000since 2019年,\u00a0ok"
    assert words_of(text) == ["我", "用", "Python", "编", "程", "since", "2019", "年", ",", "ok"]


def test_split_thai_keeps_combining_marks_with_their_base():
    words = words_of("ที่นี่")
    assert "".join(words) == "ที่นี่"
    for w in words:
        assert w[0] not in "\u0e48\u0e35"  # no word starts with a combining vowel or tone mark


def test_split_handles_empty_and_whitespace():
    assert split_words("") == []
    assert split_words(" \n\t ") == []


# ---------------------------------------------------------------------------- rate and selection


@pytest.mark.parametrize("rate", [0, -0.1, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_rate_is_validated(rate):
    with pytest.raises(InvalidInputError, match="rate"):
        check_rate(rate)
    with pytest.raises(InvalidInputError, match="rate"):
        LengthCompressor().compress(["some text here"], rate=rate)


def test_texts_must_be_a_list():
    with pytest.raises(InvalidInputError):
        LengthCompressor().compress("one string", rate=0.5)


def test_rate_one_and_empty_texts_come_back_unchanged():
    texts = ["  Spaced   text,\n\nwith  breaks.  ", "", "   \n"]
    comp = LengthCompressor()
    assert comp.compress(texts, rate=1.0) == texts
    assert comp.compress(texts, rate=0.5)[1:] == texts[1:]


def test_select_words_prefers_high_scores_and_honours_force():
    keep = select_words([0.1, 0.9, 0.5, 0.2], [1, 1, 1, 1], 0.5)
    assert keep == [False, True, True, False]
    keep = select_words([0.1, 0.9, 0.5, 0.2], [1, 1, 1, 1], 0.5, [True, False, False, False])
    assert keep == [True, True, False, False]
    # forced words are kept even beyond the budget
    assert select_words([0.0, 1.0], [5, 1], 0.1, [True, False]) == [True, False]
    # at least one word survives a tiny rate
    assert sum(select_words([0.3, 0.2], [4, 4], 0.01)) == 1


@pytest.mark.parametrize("rate", [0.2, 0.33, 0.5, 0.7, 0.9])
def test_kept_tokens_close_to_rate_and_no_half_words(rate):
    text = (
        "Retrieval augmented generation keeps passages beside the model, and compression drops the "
        "words that carry the least information so that caches shrink while answers stay correct."
    )
    out = LengthCompressor().compress([text], rate=rate)[0]
    kept = words_of(out)
    assert is_subsequence(kept, words_of(text))  # order kept, every output word is an input word
    total = sum(len(w) for w in words_of(text))
    longest = max(len(w) for w in words_of(text))
    assert abs(sum(len(w) for w in kept) - rate * total) <= longest


def test_spacing_and_line_breaks_are_original():
    text = "alpha  beta\n\ngamma\tdeltaword epsilonword"
    # 34 one-char tokens: the longest words are kept until about 0.6 x 34 = 20.4 tokens (9 + 11)
    assert LengthCompressor().compress([text], rate=0.6) == ["deltaword epsilonword"]
    # beta (the shortest) dropped: the paragraph break beside it wins over its double space
    assert LengthCompressor().compress([text], rate=0.88) == ["alpha\n\ngamma\tdeltaword epsilonword"]


def test_dropped_paragraph_break_survives():
    text = "tiny\n\nx enormousword"
    assert LengthCompressor().compress([text], rate=0.8) == ["enormousword"]
    assert LengthCompressor().compress([text], rate=0.9) == ["tiny\n\nenormousword"]


def test_dropped_cjk_between_latin_words_leaves_a_space():
    text = "alphaword中betaword"
    out = LengthCompressor().compress([text], rate=0.9)[0]
    assert out == "alphaword betaword"


def test_force_keep_digits_and_listed_words():
    text = "aaaaaaaaaa bbbbbbbbbb in 1999 the Oslo, cccccccccc x7 dddddddddd"
    plain = LengthCompressor().compress([text], rate=0.3)[0]
    assert "1999" not in plain and "Oslo," not in plain
    comp = LengthCompressor(keep_digits=True, force_keep=["oslo"])
    out = comp.compress([text], rate=0.3)[0]
    kept = words_of(out)
    assert {"1999", "x7", "Oslo,"} <= set(kept)
    assert is_subsequence(kept, words_of(text))
    # per-call override
    out = LengthCompressor().compress([text], rate=0.3, force_keep=["THE"])[0]
    assert "the" in words_of(out)


def test_non_latin_round_trip_without_mojibake():
    texts = [
        "北京是中国的首都，也是政治中心。",
        "القاهرة هي عاصمة مصر وأكبر مدنها.",
        "दिल्ली भारत की राजधानी है।",
    ]
    comp = LengthCompressor()
    for text in texts:
        out = comp.compress([text], rate=0.5)[0]
        assert out and is_subsequence(words_of(out), words_of(text))
        assert all(ch in text or ch == " " for ch in out)


# ---------------------------------------------------------------------------- selfinfo


SENTENCE = "the river flows past old stone houses while children play music near the quiet market square"


def direct_word_surprisals(model, tokenizer, text: str, bos: int | None) -> list[float]:
    """Surprisal per word, computed here without the compressor (each word of SENTENCE is one token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())  # one WordPiece token per word
    full = ([bos] if bos is not None else []) + ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    sur = [-logp[i - 1, full[i]].item() for i in range(1, len(full))]
    if bos is None:
        sur = [sum(sur) / len(sur), *sur]
    return sur


@pytest.mark.parametrize("use_bos", [False, True])
def test_selfinfo_keeps_the_most_surprising_words(tiny_generator, use_bos):
    tok = tiny_generator.tokenizer
    bos = None
    if use_bos:
        tok = type(tok).from_pretrained(tiny_generator.path)
        tok.bos_token = "[CLS]"
        bos = tok.bos_token_id
    comp = SelfInfoCompressor(tiny_generator.model, tok, device="cpu")
    assert comp.bos_id == bos
    sur = direct_word_surprisals(tiny_generator.model, tok, SENTENCE, bos)
    words = SENTENCE.split()
    out = comp.compress([SENTENCE], rate=0.4)[0]
    n_keep = round(0.4 * len(words))
    top = sorted(range(len(words)), key=lambda i: -sur[i])[:n_keep]
    assert out.split() == [words[i] for i in sorted(top)]
    # the scores themselves match the direct computation
    verdict = comp.score_words([SENTENCE], [split_words(SENTENCE)])[0]
    assert verdict.token_counts == [1] * len(words)
    assert verdict.scores == pytest.approx(sur, abs=1e-4)
    assert comp.compress([SENTENCE], rate=0.4) == [out]  # deterministic


def test_selfinfo_from_generator_windows_and_batching(tiny_generator):
    texts = [
        SENTENCE,
        "Zürich liegt am See und hat 420000 Einwohner.",
        "北京是中国的首都。",
        "",
        SENTENCE + " and " + SENTENCE.upper() + " again " * 30,
    ]
    comp = open_compressor("selfinfo", generator=tiny_generator, window=16, batch_tokens=40, keep_digits=True)
    together = comp.compress(texts, rate=0.5)
    alone = [comp.compress([t], rate=0.5)[0] for t in texts]
    assert together == alone
    assert together[3] == ""
    assert "420000" in together[1]
    for text, out in zip(texts, together, strict=True):
        assert is_subsequence(words_of(out), words_of(text))
    # windowing covers every token: all words of the long text got a token count
    long_words = split_words(texts[4])
    verdict = comp.score_words([texts[4]], [long_words])[0]
    assert all(c >= 1 for c in verdict.token_counts)
    assert all(math.isfinite(s) for s in verdict.scores)


def test_selfinfo_rate_in_tokens(tiny_generator):
    comp = SelfInfoCompressor(generator=tiny_generator)
    text = (
        "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen in chloroplasts."
    )
    tok = tiny_generator.tokenizer
    total = len(tok(text, add_special_tokens=False)["input_ids"])
    for rate in (0.3, 0.5, 0.7):
        out = comp.compress([text], rate=rate)[0]
        kept = len(tok(out, add_special_tokens=False)["input_ids"])
        longest = max(len(tok(w, add_special_tokens=False)["input_ids"]) for w in text.split())
        assert abs(kept - rate * total) <= longest


def test_selfinfo_needs_a_model():
    with pytest.raises(InvalidInputError):
        SelfInfoCompressor()


# ---------------------------------------------------------------------------- classifier


KEEP_STRENGTH = {"alpha": 1.0, "river": 2.0, "stone": 3.0, "music": 4.0, "##bly": 4.0}


def build_classifier(tiny_model_dir, folder, strengths: dict[str, float]):
    """A BERT token classifier whose keep probability is a known increasing function of a per-token
    strength: attention and feed-forward outputs are zeroed, so each position's final state is the
    layer-normalised word embedding, and the head reads one coordinate of it."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = BertConfig.from_pretrained(str(tiny_model_dir), num_labels=2)
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        emb = model.bert.embeddings
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        words = emb.word_embeddings.weight
        words.zero_()
        words[:, 0] = -1.0
        words[:, 1] = 1.0
        words[:, 2] = 1.0
        words[:, 3] = -1.0
        for token, s in strengths.items():
            tid = tok.convert_tokens_to_ids(token)
            assert tid != tok.unk_token_id
            words[tid, 0] = s
            words[tid, 1] = -s
        head = model.classifier
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 0] = 0.5  # keep logit grows with the strength coordinate
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    return build_classifier(tiny_model_dir, tmp_path_factory.mktemp("tiny-classifier"), KEEP_STRENGTH)


def test_classifier_loads_from_a_path_and_keeps_marked_words(classifier_dir):
    comp = open_compressor("classifier", path=str(classifier_dir))
    assert isinstance(comp, ClassifierCompressor)
    text = "the alpha dog saw a river of stone and heard music"  # 11 one-token words, 4 marked
    assert comp.compress([text], rate=4 / 11) == ["alpha river stone music"]
    # graded: the two strongest marked words at a smaller rate
    assert comp.compress([text], rate=2 / 11) == ["stone music"]
    # the keep label can be flipped: the unmarked words are then the ones kept
    flipped = ClassifierCompressor(classifier_dir, keep_label=0)
    assert flipped.compress([text], rate=7 / 11) == ["the dog saw a of and heard"]


def test_classifier_word_probability_is_mean_over_subtokens(classifier_dir):
    comp = ClassifierCompressor(classifier_dir)
    text = "alpha unbelievably music"
    offsets, probs = comp.keep_probabilities([text])[0]
    verdict = comp.score_words([text], [split_words(text)])[0]
    assert verdict.token_counts[0] == 1 and verdict.token_counts[2] == 1
    n = verdict.token_counts[1]
    assert n > 1
    assert verdict.scores[1] == pytest.approx(sum(probs[1 : 1 + n]) / n)
    # "unbelievably" = un ##bel ##ie ##va ##bly, only the last marked: its mean sits between the two
    assert probs[1 + n - 1] > probs[1] and probs[1 + n - 1] > verdict.scores[1] > probs[1]
    assert verdict.scores[2] > verdict.scores[0] > verdict.scores[1]


def test_classifier_batching_and_windows_match_one_at_a_time(classifier_dir):
    texts = [
        "the alpha dog saw a river of stone and heard music",
        "music " * 200 + "alpha river",
        "   ",
        "北京 music 是 stone。",
    ]
    comp = ClassifierCompressor(classifier_dir, batch_size=3, max_length=32, keep_digits=True)
    together = comp.compress(texts, rate=0.3)
    assert together == [comp.compress([t], rate=0.3)[0] for t in texts]
    assert together[2] == "   "
    for text, out in zip(texts, together, strict=True):
        assert is_subsequence(words_of(out), words_of(text))


def test_classifier_missing_path_and_bad_options(tmp_path, classifier_dir):
    with pytest.raises(ModelNotFoundError):
        open_compressor("classifier", path=str(tmp_path / "absent"))
    with pytest.raises(ModelNotFoundError):
        ClassifierCompressor(tmp_path)  # an empty folder
    with pytest.raises(InvalidInputError):
        ClassifierCompressor(classifier_dir, keep_label=2)
    with pytest.raises(InvalidInputError):
        open_compressor("classifier")
    with pytest.raises(InvalidInputError, match="unknown compression method"):
        open_compressor("zip")
