"""Text encoders: the `Encoder` interface, a sentence-transformers implementation with token-budget
length-sorted batching, and an embedding cache keyed by model fingerprint and text hash."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from kvrag.encoders.compress import truncate
from kvrag.encoders.models import model_fingerprint, resolve_model
from kvrag.errors import InvalidInputError, ModelNotFoundError

Kind = Literal["query", "passage"]
log = logging.getLogger(__name__)


class Encoder(Protocol):
    """Turns texts into L2-normalised float32 embeddings."""

    name: str
    dim: int
    max_tokens: int
    fingerprint: str

    def encode(
        self,
        texts: Sequence[str],
        *,
        kind: Kind = "passage",
        dim: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class EncoderConfig:
    """How to build an encoder. `batch_tokens` bounds padded tokens per forward pass."""

    model: str = "bundled:multilingual-e5-small"
    models_dir: Path = Path("~/.local/share/kvrag/models").expanduser()
    device: str = "cpu"
    batch_tokens: int = 8192
    max_batch: int = 128
    max_tokens: int | None = None
    cache_path: Path | None = None


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("encode() takes a list of texts, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InvalidInputError(f"text {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise InvalidInputError(f"text {i} is empty: remove empty texts before encoding")
    return out


class SentenceTransformerEncoder:
    """A sentence-transformers model run with our own batching.

    Texts are tokenised once, sorted by token length and grouped so that each batch holds at most
    `batch_tokens` padded tokens: short texts go in large batches, long ones in small batches, and
    padding is minimal. Prompts (`query: ` / `passage: `) come from the model's own configuration.
    """

    def __init__(self, config: EncoderConfig):
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.set_verbosity_error()  # long-text token counts are expected, not errors
        transformers.logging.disable_progress_bar()

        self.config = config
        path = resolve_model(config.model, config.models_dir)
        try:
            self.model = SentenceTransformer(path, device=config.device)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"cannot load encoder {config.model!r} ({exc.__class__.__name__}): use a bundled model "
                f"(kvrag models), a local folder, or a hub id where a model hub is reachable"
            ) from exc
        self.model.eval()
        if config.max_tokens:
            self.model.max_seq_length = config.max_tokens
        self.name = config.model
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.fingerprint = model_fingerprint(path) + f"-{self.max_tokens}"
        self.tokenizer = self.model.tokenizer
        prompts = self.model.prompts or {}
        self.prompts: dict[str, str] = {
            "query": prompts.get("query", ""),
            "passage": prompts.get("passage", prompts.get("document", "")),
        }
        self._torch = torch
        self._lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts without special tokens or prompt (used by the chunker)."""
        if not texts:
            return []
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in enc]

    def batches(self, lengths: Sequence[int]) -> list[np.ndarray]:
        """Index groups in decreasing length order, each within the padded-token budget."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out, cur, cur_max = [], [], 0
        for i in order:
            longest = max(cur_max, lengths[i])
            if cur and (
                longest * (len(cur) + 1) > self.config.batch_tokens or len(cur) >= self.config.max_batch
            ):
                out.append(np.asarray(cur))
                cur, longest = [], lengths[i]
            cur.append(i)
            cur_max = longest
        if cur:
            out.append(np.asarray(cur))
        return out

    def encode(
        self,
        texts: Sequence[str],
        *,
        kind: Kind = "passage",
        dim: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed texts as queries or passages; `dim` truncates (Matryoshka) and re-normalises."""
        if kind not in ("query", "passage"):
            raise InvalidInputError(f"kind must be 'query' or 'passage', not {kind!r}")
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, dim or self.dim), dtype=np.float32)
        prompt = self.prompts[kind]
        enc = self.tokenizer([prompt + t for t in texts], truncation=True, max_length=self.max_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        groups = self.batches([len(x) for x in ids])
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=f"encode {kind}s", unit="text", disable=not show_progress)
        torch = self._torch
        with self._lock, torch.inference_mode():
            for g in groups:
                features = self.tokenizer.pad(
                    {"input_ids": [ids[i] for i in g], "attention_mask": [mask[i] for i in g]},
                    return_tensors="pt",
                )
                features = {k: v.to(self.model.device) for k, v in features.items()}
                emb = self.model(features)["sentence_embedding"]
                out[g] = emb.float().cpu().numpy()
                bar.update(len(g))
        bar.close()
        return truncate(out, dim)


class EmbeddingCache:
    """Full-dimension float32 embeddings in SQLite, keyed by sha256(model fingerprint, kind, text).

    Re-indexing unchanged passages and repeated evaluations then skip the encoder entirely. Values
    are raw little-endian float32 bytes, never pickles.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def key(fingerprint: str, kind: str, text: str) -> bytes:
        return hashlib.sha256(f"{fingerprint}\x00{kind}\x00{text}".encode()).digest()

    def get_many(self, keys: list[bytes], dim: int) -> list[np.ndarray | None]:
        found: dict[bytes, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
                found.update(rows.fetchall())
        out: list[np.ndarray | None] = []
        for k in keys:
            blob = found.get(k)
            out.append(
                np.frombuffer(blob, dtype="<f4") if blob is not None and len(blob) == 4 * dim else None
            )
        return out

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?)",
                [(k, np.asarray(v, dtype="<f4").tobytes()) for k, v in items],
            )
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class CachedEncoder:
    """An encoder that consults an EmbeddingCache before computing (same interface as Encoder)."""

    def __init__(self, inner: Encoder, cache: EmbeddingCache):
        self.inner, self.cache = inner, cache
        self.name, self.dim, self.max_tokens, self.fingerprint = (
            inner.name,
            inner.dim,
            inner.max_tokens,
            inner.fingerprint,
        )
        self.hits = self.misses = 0

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def encode(
        self,
        texts: Sequence[str],
        *,
        kind: Kind = "passage",
        dim: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        texts = _check_texts(texts)
        keys = [EmbeddingCache.key(self.fingerprint, kind, t) for t in texts]
        cached = self.cache.get_many(keys, self.dim)
        missing = [i for i, v in enumerate(cached) if v is None]
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, v in enumerate(cached):
            if v is not None:
                out[i] = v
        if missing:
            fresh = self.inner.encode([texts[i] for i in missing], kind=kind, show_progress=show_progress)
            out[missing] = fresh
            self.cache.put_many([(keys[i], fresh[j]) for j, i in enumerate(missing)])
        return truncate(out, dim)


def load_encoder(config: EncoderConfig) -> Encoder:
    """Build the encoder a config describes, wrapped in its embedding cache when one is configured."""
    enc: Encoder = SentenceTransformerEncoder(config)
    if config.cache_path is not None:
        enc = CachedEncoder(enc, EmbeddingCache(config.cache_path))
    return enc
