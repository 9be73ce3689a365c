"""LoRA adapters merged into their base encoder: the committed code adapter and adapter folders as specs.

`bundled:code-e5-small` is the bundled multilingual-e5-small with the committed adapter
(`encoders/adapters/code-e5-small/`: `adapter_config.json`, `adapter_model.safetensors`) merged into
its weights, saved once as an ordinary sentence-transformers folder under the models folder and rebuilt
whenever the adapter changes. Any other adapter folder given as an encoder spec is merged into the
base model its `adapter_config.json` names, once, under `models_dir/adapters/`.

The adapters are trained from a checkout (`python -m training.code_adapter`, not part of the package).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from kvrag.encoders.staging import marker_matches, staged_folder
from kvrag.errors import ModelNotFoundError

NAME = "code-e5-small"
ADAPTER_DIR = Path(__file__).resolve().parent / "adapters" / NAME
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_digest(adapter_dir: Path) -> str:
    """A short hash of an adapter's config and weights (what the merged folder is checked against)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update((Path(adapter_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def check_adapter(adapter_dir: Path) -> None:
    """Raise ModelNotFoundError unless `adapter_dir` holds an adapter's config and weights."""
    missing = [n for n in ADAPTER_FILES if not (Path(adapter_dir) / n).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{adapter_dir}: the code adapter is missing ({', '.join(missing)}): train it from a checkout "
            f"with `python -m training.code_adapter --out encoders/adapters/{NAME}`"
        )


def build_merged_folder(dest: Path, base_folder: Path, adapter_dir: Path) -> Path:
    """Write `dest`: the encoder at `base_folder` with the LoRA adapter merged into its weights, plus
    the base's tokenizer and sentence-transformers files, so it loads like any encoder folder."""
    from peft import PeftModel
    from transformers import AutoModel

    check_adapter(adapter_dir)
    base_folder, dest = Path(base_folder), Path(dest)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_folder)), str(adapter_dir))
    merged = model.merge_and_unload()
    with staged_folder(dest) as tmp:
        for p in base_folder.iterdir():  # tokenizer, pooling and prompt files, not the weights
            if (
                p.name.startswith((".", "kvrag"))
                or p.suffix in (".safetensors", ".bin")
                or p.name == "config.json"
            ):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        merged.save_pretrained(str(tmp))
        (tmp / "kvrag-adapter.json").write_text(
            json.dumps({"adapter_sha256_16": adapter_digest(adapter_dir), "base": str(base_folder)}),
            encoding="utf-8",
        )
    return dest


def _merged_folder(folder: Path, base_folder: Path, adapter_dir: Path) -> Path:
    """`folder` holding base + adapter merged: reused while it matches the adapter, else rebuilt."""
    check_adapter(adapter_dir)
    if marker_matches(folder / "kvrag-adapter.json", "adapter_sha256_16", adapter_digest(adapter_dir)):
        return folder
    return build_merged_folder(folder, Path(base_folder), adapter_dir)


def code_encoder_folder(models_dir: Path, base_folder: Path, adapter_dir: Path = ADAPTER_DIR) -> Path:
    """The prepared `bundled:code-e5-small` folder (built on first use, rebuilt when the adapter changed)."""
    return _merged_folder(Path(models_dir) / NAME, base_folder, adapter_dir)


def adapter_encoder_folder(
    adapter_dir: Path, models_dir: Path, resolve_model: Callable[[str, Path], str]
) -> Path:
    """An adapter folder used as an encoder spec: the base model its `adapter_config.json` names
    (turned into a folder by `resolve_model`, `kvrag.encoders.models.resolve_model`), with the
    adapter merged in, prepared once under `models_dir/adapters/` (so a freshly trained adapter is
    evaluated with `--encoder DIR`)."""
    adapter_dir = Path(adapter_dir)
    base_spec = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path"
    )
    if not base_spec:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json names no base model")
    base_folder = Path(resolve_model(base_spec, models_dir))
    return _merged_folder(
        Path(models_dir) / "adapters" / adapter_digest(adapter_dir), base_folder, adapter_dir
    )


__all__ = [
    "ADAPTER_DIR",
    "NAME",
    "adapter_digest",
    "adapter_encoder_folder",
    "build_merged_folder",
    "check_adapter",
    "code_encoder_folder",
]
