"""POST /v1/embeddings: OpenAI-compatible, with Matryoshka `dimensions` and a `precision` extension."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter

from kvrag.service.deps import State
from kvrag.service.errors import ApiError, LimitExceeded
from kvrag.service.schemas import EmbeddingItem, EmbeddingsRequest, EmbeddingsResponse, EmbeddingUsage
from kvrag.service.work import run_model_work

router = APIRouter(tags=["embeddings"])


def to_precision(x: np.ndarray, precision: str) -> np.ndarray:
    """float32 as is; int8 with one symmetric scale per vector (so cosine similarity is kept);
    ubinary as sign bits packed 8 per byte (numpy bit order: first dimension in the high bit)."""
    if precision == "float32":
        return x.astype(np.float32)
    if precision == "int8":
        peak = np.abs(x).max(axis=1, keepdims=True)
        peak[peak == 0] = 1.0
        return np.clip(np.rint(x / peak * 127.0), -127, 127).astype(np.int8)
    return np.packbits(x > 0, axis=1)


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def create_embeddings(body: EmbeddingsRequest, state: State) -> EmbeddingsResponse:
    s = state.settings
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise ApiError(422, "input is empty: give a string or a non-empty list of strings")
    if len(texts) > s.max_inputs:
        raise LimitExceeded("the number of inputs", len(texts), s.max_inputs, "max_inputs")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ApiError(422, f"input[{i}] is empty")
        if len(t) > s.max_input_chars:
            raise LimitExceeded(
                f"input[{i}] length in characters", len(t), s.max_input_chars, "max_input_chars"
            )
    encoder = state.encoder(body.model)
    dim = body.dimensions or encoder.dim
    if dim > encoder.dim:
        raise ApiError(422, f"dimensions is {dim}; {encoder.name} has {encoder.dim}")
    if body.precision == "ubinary" and dim % 8:
        raise ApiError(422, f"ubinary needs dimensions divisible by 8, got {dim}")

    def produce(stop):
        yield encoder.encode(texts, kind=body.input_type, dim=dim), sum(encoder.count_tokens(texts))

    ((vecs, tokens),) = await run_model_work(state.gate, produce)
    state.metrics.embedded.inc(len(texts))
    codes = to_precision(vecs, body.precision)
    items = []
    for i, row in enumerate(codes):
        if body.encoding_format == "base64":
            value: list | str = base64.b64encode(
                np.ascontiguousarray(row).astype(row.dtype.newbyteorder("<")).tobytes()
            ).decode()
        else:
            value = row.tolist()
        items.append(EmbeddingItem(index=i, embedding=value))
    return EmbeddingsResponse(
        data=items,
        model=encoder.name,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        precision=body.precision,
        dimensions=dim,
    )
