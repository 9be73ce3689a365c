"""Training the LoRA code adapter (`training.code_adapter`) on a tiny random BERT; never the bundled models."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from kvrag.encoders.lora import adapter_digest, build_merged_folder, code_encoder_folder
from kvrag.errors import InvalidInputError, ModelNotFoundError
from training.code_adapter import (
    AdapterConfig,
    add_lora,
    distill_loss,
    embed,
    fit,
    load_base,
    make_batches,
    matryoshka_mnrl_loss,
    read_prompts,
    teacher_batch_scores,
    teacher_embeddings,
    train_code_adapter,
)
from training.code_pairs import Pair

PAIRS = [
    Pair("split a header line", "def split(line):\n    return line.partition(':')"),
    Pair("running average of numbers", "def mean(xs):\n    return sum(xs) / len(xs)"),
    Pair("reverse a string", "def rev(s):\n    return s[::-1]"),
    Pair("open a file and read it", "def read(p):\n    with open(p) as f:\n        return f.read()"),
    Pair("count words", "def count(t):\n    return len(t.split())", task="name"),
    Pair("join paths", "def join(a, b):\n    return a + '/' + b"),
]


def _cfg(tmp_path, tiny_model_dir, **kw) -> AdapterConfig:
    base = {
        "out": tmp_path / "adapter",
        "base": str(tiny_model_dir),
        "dims": (32, 16),
        "rank": 4,
        "alpha": 8,
        "batch_size": 4,
        "lr": 1e-2,
        "heldout": 0,
        "max_steps": 2,
        "query_max_length": 32,
        "code_max_length": 48,
    }
    return AdapterConfig(**{**base, **kw})


def _lora_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_matryoshka_mnrl_loss_decreases_on_toy_batch(tiny_model_dir, tmp_path):
    import torch

    cfg = _cfg(tmp_path, tiny_model_dir, batch_size=6, epochs=30, max_steps=30, lora_dropout=0.0, warmup=0.0)
    model, tok = load_base(tiny_model_dir)
    model = add_lora(model, cfg)
    losses = fit(model, tok, PAIRS, cfg, read_prompts(tiny_model_dir))
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.6 * losses[0]  # noisy: the base keeps its dropout
    q = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    perfect = matryoshka_mnrl_loss(q, q.clone(), (32, 16), scale=20.0)
    shuffled = matryoshka_mnrl_loss(q, q.flip(0), (32, 16), scale=20.0)
    assert perfect < shuffled


def test_training_is_seeded(tiny_model_dir, tmp_path):
    states = []
    for _ in range(2):
        cfg = _cfg(tmp_path, tiny_model_dir)
        model, tok = load_base(tiny_model_dir)
        model = add_lora(model, cfg)
        fit(model, tok, PAIRS, cfg, read_prompts(tiny_model_dir))
        states.append(_lora_state(model))
    assert states[0].keys() == states[1].keys() and states[0]
    for k in states[0]:
        assert np.array_equal(states[0][k].numpy(), states[1][k].numpy()), k


def test_gradient_checkpointing_trains_the_same_weights(tiny_model_dir, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the result: same losses and
    LoRA weights as a plain run (dropout on, so replayed masks are checked too), and the model is
    left without checkpointing."""
    runs, forwards = [], []
    for ckpt in (False, True):
        cfg = _cfg(tmp_path, tiny_model_dir, epochs=2, max_steps=3, gradient_checkpointing=ckpt)
        model, tok = load_base(tiny_model_dir)
        model = add_lora(model, cfg)
        calls = []  # a layer inside the checkpointed block runs again in the backward pass
        model.get_base_model().encoder.layer[0].attention.register_forward_hook(
            lambda *_, c=calls: c.append(1)
        )
        losses = fit(model, tok, PAIRS, cfg, read_prompts(tiny_model_dir))
        runs.append((losses, _lora_state(model)))
        forwards.append(len(calls))
        base = model.get_base_model()
        new_name = hasattr(type(base), "is_activation_checkpointing")
        assert not (base.is_activation_checkpointing if new_name else base.is_gradient_checkpointing)
    (l0, s0), (l1, s1) = runs
    assert forwards[0] == 6 and forwards[1] == 12  # 3 steps x (queries, codes), recomputed once
    assert len(l0) == 3 and np.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    changed = False
    for k in s0:
        assert np.allclose(s0[k].numpy(), s1[k].numpy(), rtol=1e-4, atol=1e-6), k
        changed |= bool((s0[k] != 0).any()) and "lora_B" in k
    assert changed  # training moved the zero-initialised B matrices


def test_adapter_round_trip_and_merged_folder(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    cfg = _cfg(tmp_path, tiny_model_dir)
    report = train_code_adapter(cfg, models_dir=tmp_path / "models", pairs=PAIRS * 2, log=lambda *_: None)
    out = cfg.out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"] == 2 == report["steps"] and recipe["config"]["rank"] == 4
    assert recipe == json.loads(json.dumps(report))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "python -m training.code_adapter" in (out / "README.md").read_text()

    # the trained model, rebuilt deterministically, vs base + saved adapter in a fresh model
    trained, tok = load_base(tiny_model_dir, attention_dropout=cfg.attention_dropout)
    trained = add_lora(trained, cfg)
    fit(trained, tok, PAIRS * 2, cfg, read_prompts(tiny_model_dir))
    fresh = PeftModel.from_pretrained(load_base(tiny_model_dir)[0], str(out)).eval()
    texts = [p.code for p in PAIRS]
    a = embed(trained, tok, texts, "passage: ", 48).numpy()
    b = embed(fresh, tok, texts, "passage: ", 48).numpy()
    base = embed(load_base(tiny_model_dir)[0].eval(), tok, texts, "passage: ", 48).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - base).max() > 1e-4  # the adapter changed something

    # what the package loads: the adapter merged into the base, as an encoder folder
    merged_dir = build_merged_folder(tmp_path / "merged", tiny_model_dir, out)
    st = SentenceTransformer(str(merged_dir), device="cpu")
    st.max_seq_length = 48
    np.testing.assert_allclose(st.encode(texts, prompt="passage: ", convert_to_numpy=True), b, atol=1e-5)
    assert st.prompts.get("query") == "query: "

    # a retrained adapter committed over the old one: the bundled-style folder is rebuilt
    models = tmp_path / "models"
    folder = code_encoder_folder(models, tiny_model_dir, out)
    cfg2 = replace(cfg, out=tmp_path / "adapter2", seed=1)
    train_code_adapter(cfg2, models_dir=models, pairs=PAIRS * 2, log=lambda *_: None)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).write_bytes((cfg2.out / name).read_bytes())
    code_encoder_folder(models, tiny_model_dir, out)
    marker = json.loads((folder / "kvrag-adapter.json").read_text())
    assert marker["adapter_sha256_16"] == adapter_digest(out)


def test_random_batches_cover_every_pair_once():
    lengths = [7, 3, 9, 1, 5, 2, 8, 4, 6, 0]
    batches = make_batches(lengths, 3, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert sorted(len(b) for b in batches) == [1, 3, 3, 3]
    # one window (8 x 3 pairs covers all 10): each batch is a run of similar code lengths
    for b in batches:
        ranks = sorted(sorted(range(10), key=lambda i: lengths[i]).index(i) for i in b)
        assert ranks == list(range(ranks[0], ranks[0] + len(b)))
    assert make_batches(lengths, 3, random.Random(0)) == batches


def test_distill_loss_is_zero_on_the_teachers_scores_and_grows_with_disagreement():
    import torch

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    same = distill_loss(q, c, q @ c.T, (32,), scale=20.0, teacher_scale=20.0)
    assert abs(float(same)) < 1e-5
    # truncated dims rank differently from the full-dim teacher: a positive term per extra dim
    assert float(distill_loss(q, c, q @ c.T, (32, 16), 20.0, 20.0)) > 1e-3
    flipped = distill_loss(q, c.flip(0), q @ c.T, (32,), 20.0, 20.0)
    assert float(flipped) > 0.1
    # two teachers: their mean score, over the rows and codes a batch holds (in that order)
    t1 = (q, c)
    t2 = (q.flip(1), c.flip(1))
    rows, codes = [3, 0], [3, 0, 5]
    want = (q[rows] @ c[codes].T + q[rows].flip(1) @ c[codes].flip(1).T) / 2
    assert torch.allclose(teacher_batch_scores([t1, t2], rows, codes), want)


def test_distillation_pulls_the_student_towards_the_teacher(tiny_model_dir, tmp_path):
    """A teacher that ranks code i+1 first for query i: training with it moves the student's
    in-batch distribution towards the teacher's far more than the ranking loss alone."""
    import torch

    n = len(PAIRS)
    eye = torch.eye(n)
    tq = eye
    tc = eye.roll(-1, dims=0)  # query i scores code i+1 at 1, the rest at 0
    tc = 0.6 * tc + 0.4 * eye  # and its own code next
    tc = torch.nn.functional.normalize(tc, dim=-1)
    teachers = [(tq, tc)]

    def gap(model, tok, cfg):
        prompts = read_prompts(tiny_model_dir)
        q = embed(model, tok, [p.query for p in PAIRS], prompts["query"], cfg.query_max_length)
        c = embed(model, tok, [p.code for p in PAIRS], prompts["passage"], cfg.code_max_length)
        return float(distill_loss(q, c, teacher_batch_scores(teachers, range(n), range(n)), (32,)))

    gaps = {}
    for name, kw in {"plain": {}, "distilled": {"distill_weight": 5.0}}.items():
        cfg = _cfg(
            tmp_path,
            tiny_model_dir,
            batch_size=n,
            epochs=25,
            max_steps=25,
            lora_dropout=0.0,
            warmup=0.0,
            **kw,
        )
        model, tok = load_base(tiny_model_dir)
        model = add_lora(model, cfg)
        before = gap(model, tok, cfg)
        fit(model, tok, PAIRS, cfg, read_prompts(tiny_model_dir), teachers=teachers if kw else None)
        gaps[name] = (before, gap(model, tok, cfg))
    assert gaps["plain"][0] == pytest.approx(gaps["distilled"][0])  # same start
    # measured: 1.84 -> 0.98 with the teacher; 1.84 -> 9.1 without (the ranking loss wants the diagonal)
    assert gaps["distilled"][1] < 0.7 * gaps["distilled"][0]
    assert gaps["distilled"][1] < 0.3 * gaps["plain"][1]


def test_teacher_embeddings_take_the_models_folder_and_a_cache(tiny_model_dir, tmp_path):
    import torch

    cache = tmp_path / "cache" / "embeddings.sqlite"
    pairs = PAIRS[:4]
    [(q, c)] = teacher_embeddings(
        [str(tiny_model_dir)], pairs, models_dir=tmp_path / "models", embedding_cache=cache
    )
    assert q.shape == c.shape == (4, 32) and q.dtype == torch.float32
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
    assert cache.is_file()
    [(q2, c2)] = teacher_embeddings(
        [str(tiny_model_dir)], pairs, models_dir=tmp_path / "models", embedding_cache=cache
    )
    assert torch.equal(q, q2) and torch.equal(c, c2)


def test_distilled_training_run(tiny_model_dir, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, teachers=(str(tiny_model_dir),))
    report = train_code_adapter(cfg, models_dir=tmp_path / "models", pairs=PAIRS * 2, log=lambda *_: None)
    assert report["steps"] == 2 and list(report["config"]["teachers"]) == [str(tiny_model_dir)]
    assert "distillation from" in (cfg.out / "README.md").read_text()


def test_options_are_checked_before_mining(tmp_path, monkeypatch):
    import training.code_adapter as ca

    def no_mining(*a, **k):
        raise AssertionError("mined before checking the options")

    monkeypatch.setattr(ca, "mine_pairs", no_mining)
    models = tmp_path / "models"
    with pytest.raises(InvalidInputError, match="distill-weight"):
        train_code_adapter(
            AdapterConfig(out=tmp_path, teachers=("x",), distill_weight=0.0), models_dir=models
        )
    with pytest.raises(ModelNotFoundError, match="no-such-teacher"):
        train_code_adapter(
            AdapterConfig(out=tmp_path, teachers=("bundled:no-such-teacher",)), models_dir=models
        )
    with pytest.raises(InvalidInputError, match="epochs"):
        train_code_adapter(AdapterConfig(out=tmp_path, epochs=0), models_dir=models)
    with pytest.raises(InvalidInputError, match="rank"):
        train_code_adapter(AdapterConfig(out=tmp_path, rank=0), models_dir=models)
    with pytest.raises(InvalidInputError, match="cosqa"):
        train_code_adapter(AdapterConfig(out=tmp_path, cosqa=tmp_path / "absent.jsonl"), models_dir=models)
    assert not (tmp_path / "recipe.json").exists()
