"""Request and response bodies. Requests are strict (unknown fields rejected, except on the
OpenAI-compatible endpoints where clients send fields kvrag ignores); responses are separate models."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvrag.rag.generation.prefill import MODES

Mode = Literal["ape", "parallel", "sequential", "blend"]
assert set(MODES) == {"ape", "parallel", "sequential", "blend"}
Precision = Literal["float32", "int8", "ubinary"]
Filter = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """OpenAI-compatible requests: clients send fields kvrag does not use (user, n, logprobs...)."""

    model_config = ConfigDict(extra="allow")


MAX_DEPTH = 32  # nesting of arrays and objects in a request body


def _check_values(value: Any, depth: int = 0) -> None:
    """Python's JSON parser lets through what the models, tokenizers and SQLite's JSON cannot take:
    lone surrogates (an escaped half of a UTF-16 pair) in strings, NaN or Infinity, and nesting so
    deep that storing or answering it would exhaust the recursion limit (metadata is stored and
    sent back as JSON)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the body nests arrays and objects more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds a lone surrogate (\\ud800-\\udfff): send valid Unicode") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and Infinity are not JSON numbers")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_values(k, depth + 1)
            _check_values(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_values(v, depth + 1)


class _Request(BaseModel):
    """A whole request body: every string and number in it is checked once, before validation."""

    @model_validator(mode="before")
    @classmethod
    def _valid_values(cls, data: Any) -> Any:
        _check_values(data)
        return data


# ---------------------------------------------------------------------------------- embeddings


class EmbeddingsRequest(_Open, _Request):
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(None, description="encoder spec; default: the served encoder")
    dimensions: int | None = Field(None, ge=1, description="Matryoshka truncation (then re-normalised)")
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "passage"] = Field(
        "query", description="extension: embed as a search query or as a passage to be found"
    )
    precision: Precision = Field(
        "float32",
        description="extension: float32; int8 (per-vector symmetric scale, cosine preserved); "
        "ubinary (sign bits packed 8 per byte)",
    )


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage
    precision: Precision
    dimensions: int


# ---------------------------------------------------------------------------------- collections


class CollectionCreate(_Strict, _Request):
    name: str = Field(description="1-64 letters, digits, '_' or '-'")
    encoder: str | None = None
    precision: Precision | None = Field(None, description="index precision; picks the spec Flat/SQ8/BFlat")
    spec: str | None = Field(None, description="index spec (faiss-factory style); overrides precision")
    dim: int | None = Field(None, ge=8, description="Matryoshka truncation of stored vectors")
    max_tokens: int = Field(256, ge=16, le=8192, description="passage size in encoder tokens")
    overlap_tokens: int = Field(32, ge=0, le=1024)
    bm25_language: str | None = None
    kv_policy: Literal["eager", "lazy"] = Field(
        "eager", description="passage KV caches at upsert time (eager) or on first retrieval (lazy)"
    )


class CollectionInfo(BaseModel):
    name: str
    encoder: str
    spec: str
    precision: Precision
    dim: int | None
    max_tokens: int
    overlap_tokens: int
    kv_policy: str
    documents: int
    passages: int


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class DocumentIn(_Strict):
    id: str = Field(min_length=1, max_length=512)
    text: str
    title: str | None = None
    source: str | None = None
    kind: Literal["text", "code", "python"] = Field(
        "text", description="python is split into functions and classes; other code into line windows"
    )
    lang: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsUpsert(_Strict, _Request):
    documents: list[DocumentIn] = Field(min_length=1)
    kv: bool = Field(True, description="compute the new passages' KV caches now")


class UpsertResult(BaseModel):
    collection: str
    added: int
    replaced: int
    unchanged: int
    emptied: list[str] = Field(
        default_factory=list, description="ids whose text was empty: not stored (removed if they existed)"
    )
    passages_added: int
    passages_removed: int
    documents: int
    passages: int
    repaired: int = Field(0, description="index entries fixed that an interrupted earlier write left behind")
    kv_computed: int
    kv_present: int
    seconds: float


class PassageOut(BaseModel):
    id: int
    text: str
    start: int
    end: int
    kind: str
    lang: str | None
    section: str | None


class DocumentOut(BaseModel):
    id: str
    title: str | None
    source: str | None
    metadata: dict[str, Any]
    updated_at: str
    passages: list[PassageOut]


class SearchRequest(_Strict, _Request):
    query: str
    k: int = Field(10, ge=1)
    filter: Filter | None = None
    hybrid: bool = False
    precision: Precision | None = Field(
        None, description="must match the collection's index precision when given (fixed at creation)"
    )
    rescore: int = Field(1, ge=1, le=100, description="candidate multiplier for rescoring compressed codes")


class SearchHit(BaseModel):
    rank: int
    passage_id: int
    score: float
    doc_id: str
    title: str | None
    source: str | None
    section: str | None
    text: str
    start: int
    end: int
    lang: str | None
    kind: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    collection: str
    query: str
    hits: list[SearchHit]
    search_ms: float


# ---------------------------------------------------------------------------------- chat


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Open, _Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    # extensions
    collection: str | None = None
    k: int = Field(5, ge=1)
    mode: Mode = "ape"
    filter: Filter | None = None
    hybrid: bool = False
    repetition_penalty: float = Field(1.1, ge=1.0, le=10.0)


class Citation(BaseModel):
    rank: int
    passage_id: int
    doc_id: str
    title: str | None
    source: str | None
    score: float


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    citations: list[Citation]
    kvrag: dict[str, Any] = Field(description="mode, timings (ms) and KV cache report")


# ---------------------------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "loading", "wedged"]
    models: dict[str, str]
    kv_store: dict[str, Any]
    model_slots: dict[str, Any] = Field(default_factory=dict)
    stuck: dict[str, Any] = Field(
        default_factory=dict, description="slots and collection locks held past KVRAG_WEDGED_AFTER_S"
    )
    recovered: dict[str, Any] = Field(
        default_factory=dict,
        description="what opening each collection repaired after an interrupted write (by name)",
    )
