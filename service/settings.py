"""The one place that reads environment variables (prefix `KVRAG_`), turned into library dataclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvrag.encoders.encoder import EncoderConfig


class Settings(BaseSettings):
    """Process-wide settings. `KVRAG_HOME` holds models, collections and caches."""

    model_config = SettingsConfigDict(env_prefix="KVRAG_", extra="ignore")

    home: Path = Path("~/.local/share/kvrag")
    encoder: str = "bundled:multilingual-e5-small"
    # new collections of code files only (kvrag index). Default: the text encoder, which scores higher on
    # CoSQA at full dimension; bundled:code-e5-small scores higher at 128 dims (docs/benchmarks.md)
    code_encoder: str = "bundled:multilingual-e5-small"
    device: str = "cpu"
    batch_tokens: int = 8192
    embedding_cache: bool = True
    # Generation and passage KV caches.
    generator: str = "bundled:qwen2.5-coder-0.5b-instruct"
    # auto (float32 on CPU, bfloat16 on accelerators) | float32 | bfloat16 | float16; part of every cache key
    generator_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prompt: str = "chat"  # chat | extractive: the prompt preset (part of every cache key)
    kv_url: str | None = None  # default: file://$KVRAG_HOME/kv (embedded, no server needed)
    kv_codec: str = "fp16"
    kv_batch_tokens: int = 4096
    ape_temperature: float = 0.9
    ape_scale: float = 1.0  # T and S tuned on XQuAD-en questions 0-199 (docs/benchmarks.md)
    # where APE places the passages: shared positions (as in the APE paper) or distinct (re-rotated to
    # follow each other); XQuAD-en 0-199 showed no significant difference (docs/benchmarks.md)
    ape_positions: Literal["shared", "distinct"] = "shared"
    blend_ratio: float = 0.15  # `blend` mode: fraction of passage tokens recomputed at query time
    # HTTP service (`kvrag serve`).
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: SecretStr | None = None  # bearer key; required when bound to a non-loopback address
    encoders: str = ""  # more encoder specs collections may use, comma-separated (loaded on first use)
    default_collection: str | None = None  # chat completions without a `collection` field use it
    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs: int = 256  # embedding inputs or documents per request
    max_input_chars: int = 32_000  # per embedding input or search query
    max_document_chars: int = 1_000_000
    max_k: int = 50
    max_tokens: int = 1024  # chat completion tokens
    max_concurrency: int = 1  # model work (encoding, search, generation, indexing) at once
    max_queue: int = 64  # requests waiting for a model slot; more are answered 503
    queue_timeout_s: float = 60.0  # longest wait for a model slot before 503
    # /readyz reports the server wedged when a model slot or a collection lock is held this long
    wedged_after_s: float = 900.0
    # Connections (kvrag serve): slow or idle clients cannot hold the server.
    header_timeout_s: float = 10.0  # a request's headers must arrive within this, from its first byte
    body_timeout_s: float = 30.0  # and its body within this
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections and requests in progress; past it new ones get 503
    # Host names served (comma-separated; `*`: any). Default: any, except when bound to loopback
    # without an API key, where only loopback names are (DNS rebinding).
    allowed_hosts: str = ""

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
