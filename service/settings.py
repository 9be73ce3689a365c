"""The one place that reads environment variables (prefix `KVRAG_`), turned into library dataclasses."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from encoders.encoder import EncoderConfig


class Settings(BaseSettings):
    """Process-wide settings. `KVRAG_HOME` holds models, collections and caches."""

    model_config = SettingsConfigDict(env_prefix="KVRAG_", extra="ignore")

    home: Path = Path("~/.local/share/kvrag")
    encoder: str = "bundled:multilingual-e5-small"
    device: str = "cpu"
    batch_tokens: int = 8192
    embedding_cache: bool = True
    # Generation and passage KV caches.
    generator: str = "bundled:smollm2-135m-instruct"
    prompt: str = "chat"  # chat | extractive: the prompt preset (part of every cache key)
    kv_url: str | None = None  # default: file://$KVRAG_HOME/kv (embedded, no server needed)
    kv_codec: str = "fp16"
    kv_batch_tokens: int = 4096
    ape_temperature: float = 0.9
    ape_scale: float = 1.0  # T and S tuned on XQuAD-en questions 0-199 (docs/benchmarks.md)
    blend_ratio: float = 0.15  # `blend` mode: fraction of passage tokens recomputed at query time

    @property
    def root(self) -> Path:
        return self.home.expanduser()

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def kv_store_url(self) -> str:
        return self.kv_url or f"file://{self.root / 'kv'}"

    def encoder_config(self, model: str | None = None) -> EncoderConfig:
        return EncoderConfig(
            model=model or self.encoder,
            models_dir=self.models_dir,
            device=self.device,
            batch_tokens=self.batch_tokens,
            cache_path=self.root / "cache" / "embeddings.sqlite" if self.embedding_cache else None,
        )


def get_settings() -> Settings:
    return Settings()
