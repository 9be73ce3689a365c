"""benchmarks/adapter_mix.py: scaled and averaged adapters change the merged weights exactly as
stated (tiny random BERT with a random LoRA adapter; the CoSQA run itself is in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvrag.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mix():
    spec = importlib.util.spec_from_file_location("adapter_mix", ROOT / "benchmarks" / "adapter_mix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _adapter(tiny_model_dir, out: Path, seed: int, rank: int, alpha: int) -> Path:
    import torch

    from kvrag.encoders.code_adapter import AdapterConfig, add_lora, load_base

    torch.manual_seed(seed)
    model = add_lora(load_base(tiny_model_dir)[0], AdapterConfig(out=out, rank=rank, alpha=alpha))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # initialised to zero: give the adapter an update
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    model.save_pretrained(str(out))
    return out


def _merged(tiny_model_dir, adapter: Path, dest: Path) -> dict:
    from safetensors.torch import load_file

    from kvrag.encoders.code_adapter import build_merged_folder

    folder = build_merged_folder(dest, Path(tiny_model_dir), adapter)
    (weights,) = Path(folder).glob("*.safetensors")
    return load_file(weights)


def _close(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_scaled_and_averaged_adapters(mix, tiny_model_dir, tmp_path):
    a = _adapter(tiny_model_dir, tmp_path / "a", seed=0, rank=4, alpha=8)
    b = _adapter(tiny_model_dir, tmp_path / "b", seed=1, rank=2, alpha=8)  # another rank and scaling
    base = _merged(tiny_model_dir, mix.scale_adapter(a, tmp_path / "a0", 0.0), tmp_path / "m0")
    full = _merged(tiny_model_dir, a, tmp_path / "ma")
    half = _merged(tiny_model_dir, mix.scale_adapter(a, tmp_path / "a5", 0.5), tmp_path / "m5")
    assert not _close(base, full)  # the adapter changes the weights
    assert _close(_merged(tiny_model_dir, mix.scale_adapter(a, tmp_path / "a1", 1.0), tmp_path / "m1"), full)
    # merged weights are linear in the update: s = 0.5 lies halfway between the base and the adapter
    assert _close(half, {k: (base[k] + full[k]) / 2 for k in base})
    # the mean of an adapter and its zero-scaled copy is the halfway adapter
    mean_a0 = mix.average_adapters([a, tmp_path / "a0"], tmp_path / "mean_a0")
    assert json.loads((mean_a0 / "adapter_config.json").read_text())["r"] == 8
    assert _close(_merged(tiny_model_dir, mean_a0, tmp_path / "mm0"), half)
    # adapters of different ranks and scalings average update by update
    full_b = _merged(tiny_model_dir, b, tmp_path / "mb")
    mean_ab = _merged(tiny_model_dir, mix.average_adapters([a, b], tmp_path / "mean_ab"), tmp_path / "mab")
    assert _close(mean_ab, {k: (full[k] + full_b[k]) / 2 for k in full})
    with pytest.raises(InvalidInputError, match="two or more"):
        mix.average_adapters([a], tmp_path / "one")


class _Fixed:
    """Passages d0..d2 are the unit axes; each query's vector is given."""

    def __init__(self, q: list[list[float]], d: list[list[float]]):
        self.qv, self.dv = q, d

    def encode(self, texts, *, kind="passage", **_):
        import numpy as np

        return np.array(self.dv if kind == "passage" else self.qv, dtype=np.float32)[: len(texts)]


def test_run_reports_baselines_scales_and_towers(mix, tiny_model_dir, tmp_path, monkeypatch):
    import argparse

    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    docs = ["def add(a, b): return a + b", "def rev(s): return s[::-1]"]
    (data / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (data / "queries.jsonl").write_text(
        '{"_id": "q0", "text": "add numbers"}\n{"_id": "q1", "text": "reverse"}\n'
    )
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    a = _adapter(tiny_model_dir, tmp_path / "a", seed=0, rank=4, alpha=8)
    eye = [[1.0, 0.0], [0.0, 1.0]]
    # the base model gets both queries right, every adapter both wrong: only the towers mix the two
    monkeypatch.setattr(
        mix,
        "load_encoder",
        lambda cfg: _Fixed(eye, eye) if cfg.model == str(tiny_model_dir) else _Fixed(eye[::-1], eye),
    )
    args = argparse.Namespace(
        data=str(data), adapter=[str(a)], scale=[0.5], towers=True, out=str(tmp_path / "kept"), limit=None
    )
    rows = [(r["setting"], r["mrr@10"]) for r in mix.run(args)["settings"]]
    assert [s for s, _ in rows] == [
        f"{tiny_model_dir} (baseline)",
        f"{a} (as trained)",
        f"{a} x 0.5",
        f"queries {tiny_model_dir}, passages {a}",
        f"queries {a}, passages {tiny_model_dir}",
    ]
    assert [m for _, m in rows] == [1.0, 0.5, 0.5, 1.0, 0.5]
    assert (tmp_path / "kept" / "a0-s0.5" / "adapter_model.safetensors").is_file()
