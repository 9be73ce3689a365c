"""Build the long-lived objects (generator, KV caches, pipeline) from settings, once per process."""

from __future__ import annotations

from kvrag.encoders.encoder import load_encoder
from kvrag.index.collection import Collection
from kvrag.rag.generation.generator import Generator
from kvrag.rag.generation.loading import parse_dtype
from kvrag.rag.kvcache.manager import KVCacheManager
from kvrag.rag.kvcache.store import open_kv_store
from kvrag.rag.pipeline import RagPipeline
from kvrag.service.settings import Settings


def open_generator(
    settings: Settings, spec: str | None = None, prompt: str | None = None, dtype: str | None = None
) -> Generator:
    return Generator(
        spec or settings.generator,
        models_dir=settings.models_dir,
        device=settings.device,
        prompt=prompt or settings.prompt,
        dtype=parse_dtype(dtype or settings.generator_dtype),
    )


def open_kv(
    settings: Settings, generator: Generator, *, url: str | None = None, codec: str | None = None
) -> KVCacheManager:
    store = open_kv_store(url or settings.kv_store_url)
    return KVCacheManager(generator, store, codec or settings.kv_codec, batch_tokens=settings.kv_batch_tokens)


def open_pipeline(
    settings: Settings,
    collection: Collection,
    *,
    generator: Generator | None = None,
    kv: KVCacheManager | None = None,
) -> RagPipeline:
    encoder = load_encoder(settings.encoder_config(collection.config.encoder))
    generator = generator or open_generator(settings)
    kv = kv or open_kv(settings, generator)
    return RagPipeline(
        collection,
        encoder,
        generator,
        kv,
        ape_temperature=settings.ape_temperature,
        ape_scale=settings.ape_scale,
        ape_positions=settings.ape_positions,
        blend_ratio=settings.blend_ratio,
    )
