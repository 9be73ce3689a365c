"""The APE Triton kernel against the torch reference (interpreter on CPU, the GPU when present), and
the dispatcher: reference on CPU, Triton when forced, the generator's APE path through it.

The reference itself is checked against a naive closed form in tests/generation/test_ape.py."""

from __future__ import annotations

import pytest
import torch

from kvrag.kernels import ape_attention as mod
from kvrag.kernels.ape_attention import ape_attention, ape_attention_torch, ape_attention_triton
from kvrag.rag.generation.prefill import PrefillPolicy


def _inputs(b, hkv, rep, n, q_len, d, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * rep, q_len, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _compare(device, q, k, v, atol=2e-5, **kw):
    opts = {name: kw.pop(name) for name in ("block_m", "block_n", "splits") if name in kw}
    want = ape_attention_torch(q, k, v, **kw)
    moved = {**kw, "c_valid": kw["c_valid"].to(device) if kw.get("c_valid") is not None else None}
    got = ape_attention_triton(q.to(device), k.to(device), v.to(device), **moved, **opts)
    assert got.dtype == q.dtype and got.shape == q.shape
    err = (got.cpu().float() - want.float()).abs().max().item()
    assert err <= atol, err
    return got.cpu()


@pytest.mark.parametrize("rep", [1, 3])
@pytest.mark.parametrize(("t", "s"), [(1.0, 1.0), (0.9, 0.9)])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_matches_reference(kernel_device, rep, t, s, splits):
    # 37 slots: prefix 4, passages 21 (row 1 padded at the end), two earlier tokens, 5 new ones;
    # none of the lengths is a multiple of the 16-slot block.
    b, hkv, d, n, q_len, c0, c1 = 2, 2, 8, 37, 5, 4, 25
    q, k, v = _inputs(b, hkv, rep, n, q_len, d, seed=rep)
    valid = torch.ones(b, c1 - c0, dtype=torch.bool)
    valid[1, -5:] = False
    _compare(
        kernel_device, q, k, v, c_start=c0, c_end=c1, temperature=t, scale=s, scaling=d**-0.5,
        c_valid=valid, block_n=16, splits=splits,
    )  # fmt: skip


@pytest.mark.parametrize("rep", [1, 3])
def test_one_new_token_decode_step(kernel_device, rep):
    q, k, v = _inputs(1, 2, rep, 50, 1, 16, seed=7)
    for splits in (1, 2):
        _compare(
            kernel_device, q, k, v, c_start=6, c_end=40, temperature=0.9, scale=0.9, scaling=0.25,
            block_n=16, splits=splits,
        )  # fmt: skip


def test_t_s_one_equals_plain_causal_attention(kernel_device):
    b, h, hkv, n, q_len, d = 1, 6, 2, 29, 4, 16
    q, k, v = _inputs(b, hkv, h // hkv, n, q_len, d, seed=3)
    got = ape_attention_triton(
        q.to(kernel_device), k.to(kernel_device), v.to(kernel_device),
        c_start=5, c_end=18, temperature=1.0, scale=1.0, scaling=d**-0.5, block_n=16,
    ).cpu()  # fmt: skip
    kk, vv = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    mask = torch.ones(q_len, n, dtype=torch.bool).tril(diagonal=n - q_len)
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    assert (got - want).abs().max().item() <= 2e-5


def test_edges_no_passages_and_all_padded(kernel_device):
    q, k, v = _inputs(1, 1, 3, 20, 2, 8, seed=4)
    kw = dict(temperature=0.9, scale=0.9, scaling=0.35)
    _compare(kernel_device, q, k, v, c_start=3, c_end=3, **kw, block_n=16)
    _compare(kernel_device, q, k, v, c_start=0, c_end=0, **kw, block_n=16, splits=2)
    none = torch.zeros(1, 9, dtype=torch.bool)
    out = _compare(kernel_device, q, k, v, c_start=2, c_end=11, c_valid=none, **kw, block_n=16)
    assert torch.isfinite(out).all()
    # Passages from slot 0 (no prefix) and a batch-broadcast validity row.
    q2, k2, v2 = _inputs(2, 1, 1, 24, 3, 8, seed=5)
    row = torch.tensor([[True] * 10 + [False] * 4])
    _compare(kernel_device, q2, k2, v2, c_start=0, c_end=14, c_valid=row, **kw, block_n=16)


def test_temperature_and_scale_are_applied(kernel_device):
    """The kernel is not secretly plain attention: changing T or S changes its output."""
    q, k, v = _inputs(1, 1, 2, 30, 2, 8, seed=6)
    kw = dict(c_start=2, c_end=22, scaling=0.35, block_n=16)
    dev = [x.to(kernel_device) for x in (q, k, v)]
    base = ape_attention_triton(*dev, temperature=1.0, scale=1.0, **kw)
    assert (ape_attention_triton(*dev, temperature=0.8, scale=1.0, **kw) - base).abs().max() > 1e-3
    assert (ape_attention_triton(*dev, temperature=1.0, scale=0.8, **kw) - base).abs().max() > 1e-3


def test_half_precision(kernel_device):
    q, k, v = _inputs(1, 2, 2, 40, 4, 16, dtype=torch.float16, seed=8)
    _compare(
        kernel_device, q, k, v, atol=3e-3, c_start=5, c_end=30, temperature=0.7, scale=1.2, scaling=0.25,
        block_n=16,
    )  # fmt: skip


def test_bfloat16_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("bf16 tl.dot is not emulated faithfully by the Triton CPU interpreter; checked on a GPU")
    q, k, v = _inputs(1, 2, 3, 300, 7, 64, dtype=torch.bfloat16, seed=9)
    _compare("cuda", q, k, v, atol=2e-2, c_start=10, c_end=250, temperature=0.9, scale=0.9, scaling=0.125)


# ------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_runs_the_reference_on_cpu(monkeypatch, no_interpreter):
    calls = []
    real = mod.ape_attention_torch

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def boom(*a, **k):
        raise AssertionError("the Triton launcher must not run for CPU tensors")

    monkeypatch.setattr(mod, "ape_attention_torch", spy)
    monkeypatch.setattr(mod, "ape_attention_triton", boom)
    q, k, v = _inputs(1, 1, 2, 12, 2, 8)
    kw = dict(c_start=1, c_end=7, temperature=0.9, scale=0.9, scaling=0.35)
    assert torch.equal(ape_attention(q, k, v, **kw), real(q, k, v, **kw))
    assert calls == [1]
    with pytest.raises(ValueError, match="backend"):
        ape_attention(q, k, v, **kw, backend="gpu")
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ape_attention(q, k, v, **kw, backend="triton")


def test_dispatcher_forced_triton(kernel_device):
    q, k, v = (x.to(kernel_device) for x in _inputs(1, 1, 3, 20, 3, 8, seed=11))
    kw = dict(c_start=2, c_end=12, temperature=0.9, scale=0.9, scaling=0.35)
    got = ape_attention(q, k, v, **kw, backend="triton")
    want = ape_attention(q, k, v, **kw, backend="torch")
    assert (got - want).abs().max().item() <= 2e-5


def test_generator_ape_goes_through_the_dispatcher_on_cpu(tiny_generator, monkeypatch, no_interpreter):
    calls = []
    real = mod.ape_attention_torch

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def boom(*a, **k):
        raise AssertionError("the generator's CPU path must use the torch reference")

    monkeypatch.setattr(mod, "ape_attention_torch", spy)
    monkeypatch.setattr(mod, "ape_attention_triton", boom)
    gen = tiny_generator
    passages = [gen.passage_ids("the cat sat on the mat", "cats"), gen.passage_ids("dogs bark", "dogs")]
    gen.prefill(PrefillPolicy("ape", 0.9, 0.9), gen.question_ids("where is the cat?"), gen.context(passages))
    assert len(calls) == gen.num_layers  # one call per layer for the question prefill


def test_generator_with_the_triton_kernel_matches_the_reference(tiny_generator, kernel_device, monkeypatch):
    """Model level: the tiny GQA Llama (6 query heads over 2 KV heads) with the kernel in place of the
    reference gives the same logits, and with T = S = 1 still equals sequential encoding."""
    import functools

    import kvrag.rag.generation.ape as ape_mod

    gen = tiny_generator
    if kernel_device == "cuda":
        pytest.skip(
            "the tiny generator runs on CPU; the kernel is compared at model level under the interpreter"
        )
    passages = [
        gen.passage_ids("the cat sat on the warm mat", "cats"),
        gen.passage_ids("small birds", "birds"),
    ]
    q = gen.question_ids("where did the cat sit?")
    ape = PrefillPolicy("ape", 0.9, 0.9)
    ref_ape = gen.prefill(ape, q, gen.context(passages)).logits
    seq_one = gen.prefill("sequential", q, passages[:1]).logits
    monkeypatch.setattr(ape_mod, "ape_attention", functools.partial(mod.ape_attention, backend="triton"))
    tri_ape = gen.prefill(ape, q, gen.context(passages)).logits
    tri_par = gen.prefill("parallel", q, gen.context(passages[:1])).logits
    assert (tri_ape - ref_ape).abs().max().item() <= 1e-4
    assert (tri_par - seq_one).abs().max().item() <= 1e-4
