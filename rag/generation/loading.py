"""Loading the generator: resolve its spec, load the HF causal LM with the APE attention function,
and name the exact weights and dtype (the fingerprint every cache key carries)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrag.encoders.models import model_fingerprint
from kvrag.errors import InvalidInputError, ModelNotFoundError
from kvrag.rag.generation.ape import register
from kvrag.rag.generation.bundled import resolve_generator


@dataclass(frozen=True)
class ModelShape:
    """The sizes the caches and the length checks need, read once from the model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    # The smallest sliding attention window of any layer, None when every layer sees everything.
    sliding_window: int | None


@dataclass
class LoadedModel:
    """A causal LM ready for the prefill modes, with its tokenizer and identity."""

    model: torch.nn.Module
    tokenizer: object
    path: str
    dtype: torch.dtype
    fingerprint: str


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (exactness checks, no fast half kernels there), bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A generator dtype by name (`float32`, `bfloat16`, `float16`); `auto` or None: the device's default."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(key, key)
    if key not in DTYPES:
        raise InvalidInputError(f"unknown generator dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def model_shape(config) -> ModelShape:
    """Layer count, KV heads, head size, position limit and sliding window of a decoder config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(cfg, "layer_types", None) or ()
    window = getattr(cfg, "sliding_window", None)
    sliding = window is not None and (not layer_types or "sliding_attention" in layer_types)
    return ModelShape(
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        max_positions=int(getattr(cfg, "max_position_embeddings", 4096)),
        sliding_window=int(window) if sliding else None,
    )


def check_supported(config, spec: str) -> None:
    """Refuse models whose attention the registered APE function cannot compute exactly."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise InvalidInputError(
            f"generator {spec!r} soft-caps attention logits (attn_logit_softcapping="
            f"{cfg.attn_logit_softcapping}); the SDPA and APE attention paths have no soft-capping: "
            "use a model without it"
        )
    if getattr(cfg, "use_bidirectional_attention", False):
        raise InvalidInputError(f"generator {spec!r} uses bidirectional attention: a causal LM is needed")


def weights_digest(folder: Path) -> str:
    """Cheap content hash of the weight files: sizes plus their first and last 4 MiB."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            if size > 8 << 20:
                fh.seek(-(4 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def generator_fingerprint(path: str, dtype: torch.dtype) -> str:
    """Model identity + weights digest + dtype: caches computed under another fingerprint never mix."""
    local = Path(path)
    digest = weights_digest(local) if local.is_dir() else hashlib.sha256(path.encode()).hexdigest()[:16]
    return f"{model_fingerprint(path)}-{digest}-{str(dtype).removeprefix('torch.')}"


def load_causal_lm(
    spec: str,
    *,
    models_dir: str | os.PathLike | None = None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load the tokenizer and the causal LM of `spec` (bundled name, folder or hub id) in eval mode,
    with the APE attention function registered and selected."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    impl = register()
    path = resolve_generator(spec, models_dir or Path.home() / ".local/share/kvrag/models")
    dtype = dtype or default_dtype(device)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load takes a second; its bar is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load generator {spec!r}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_supported(model.config, spec)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, path, dtype, generator_fingerprint(path, dtype))
