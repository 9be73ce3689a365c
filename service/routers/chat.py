"""POST /v1/chat/completions: OpenAI-compatible answers over a collection, with citations.

The last user message is the question; system messages and earlier turns are not used (the system
text is part of the cached prompt prefix, so every passage cache stays valid). Extension fields:
`collection`, `k`, `mode`, `filter`, `hybrid`, `repetition_penalty`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from encoders.errors import KvragError
from rag.generation.generator import SamplingParams, TokenEvent
from rag.pipeline import RagAnswer, RagPipeline
from service.deps import State
from service.errors import ApiError, LimitExceeded, classify
from service.routers.collections import check_k, check_query
from service.schemas import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    Citation,
    Usage,
)
from service.state import AppState

router = APIRouter(tags=["chat"])
log = logging.getLogger("kvrag.service")
MIN_TEMPERATURE = 1e-3


def _question(body: ChatRequest) -> str:
    for m in reversed(body.messages):
        if m.role == "user":
            if isinstance(m.content, str):
                return m.content
            if isinstance(m.content, list):
                parts = [
                    p.get("text", "") for p in m.content if isinstance(p, dict) and p.get("type") == "text"
                ]
                if parts:
                    return "\n".join(parts)
            raise ApiError(422, "the last user message has no text content")
    raise ApiError(422, "messages has no user message: the last user message is the question")


def _pipeline(state: AppState, body: ChatRequest) -> tuple[RagPipeline, str]:
    name = body.collection or state.settings.default_collection
    if not name:
        raise ApiError(422, "collection is required (or set KVRAG_DEFAULT_COLLECTION on the server)")
    c = state.collection(name)
    s = state.settings
    pipe = RagPipeline(
        c,
        state.encoder(c.config.encoder),
        state.generator,
        state.kv,
        ape_temperature=s.ape_temperature,
        ape_scale=s.ape_scale,
        blend_ratio=s.blend_ratio,
    )
    return pipe, name


def _sampling(state: AppState, body: ChatRequest) -> SamplingParams:
    limit = state.settings.max_tokens
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, limit)
    if max_tokens > limit:
        raise LimitExceeded("max_tokens", max_tokens, limit, "max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(422, "stop takes up to 4 non-empty strings")
    return SamplingParams(
        max_new_tokens=max_tokens,
        # below this, dividing float32 logits by the temperature overflows; it is greedy in effect anyway
        temperature=body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        repetition_penalty=body.repetition_penalty,
    )


def _citations(answer: RagAnswer) -> list[dict]:
    return [Citation(**vars(c)).model_dump() for c in answer.citations]


def _extension(answer: RagAnswer, collection: str) -> dict:
    return {"collection": collection, "mode": answer.mode, "timings": answer.timings, "kv": answer.kv}


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def chat_completions(body: ChatRequest, state: State):
    question = _question(body)
    check_query(state, question, "the question")
    check_k(state, body.k)
    sampling = _sampling(state, body)
    pipe, name = _pipeline(state, body)
    model = state.generator.spec
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kwargs = {
        "k": body.k,
        "mode": body.mode,
        "filter": body.filter,
        "hybrid": body.hybrid,
        "sampling": sampling,
    }

    if not body.stream:

        def work() -> RagAnswer:
            with state.lock(name):
                return pipe.answer(question, **kwargs)

        async with state.gate.slot():
            answer = await run_in_threadpool(work)
        state.metrics.observe_answer(answer.mode, answer.timings, answer.usage["completion_tokens"])
        usage = answer.usage
        return ChatResponse(
            id=cid,
            created=created,
            model=model,
            choices=[
                Choice(message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)
            ],
            usage=Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                total_tokens=usage["prompt_tokens"] + usage["completion_tokens"],
            ),
            citations=_citations(answer),
            kvrag=_extension(answer, name),
        )

    # Streaming: a full queue or a bad filter is still a plain 503 or 422 before the 200 goes out.
    state.gate.check()
    if body.filter:

        def check_filter() -> None:
            with state.lock(name):
                pipe.collection.store.filter_ids(body.filter)

        await run_in_threadpool(check_filter)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        payload = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        lock = state.lock(name)
        it = None
        locked = False
        started = None
        try:
            started = await state.gate.acquire()
            await anyio.to_thread.run_sync(lock.acquire)
            locked = True
            it = pipe.stream(question, **kwargs)
            yield chunk({"role": "assistant", "content": ""})
            done = object()
            while True:
                item = await anyio.to_thread.run_sync(next, it, done)
                if item is done:
                    break
                if isinstance(item, TokenEvent):
                    if item.text:
                        yield chunk({"content": item.text})
                elif isinstance(item, RagAnswer):
                    state.metrics.observe_answer(item.mode, item.timings, item.usage["completion_tokens"])
                    u = item.usage
                    yield chunk(
                        {},
                        item.finish_reason,
                        citations=_citations(item),
                        usage={
                            "prompt_tokens": u["prompt_tokens"],
                            "completion_tokens": u["completion_tokens"],
                            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                        },
                        kvrag=_extension(item, name),
                    )
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the status line is sent: report in-band, no trace
            if isinstance(exc, ApiError):
                message, type_ = exc.message, exc.type
            elif isinstance(exc, KvragError):
                message, type_ = str(exc), classify(exc)[1]
            else:
                message, type_ = "internal server error", "server_error"
                log.exception("error while streaming an answer")
            yield f"data: {json.dumps({'error': {'message': message, 'type': type_}})}\n\n"
        finally:
            if it is not None:
                await anyio.to_thread.run_sync(it.close)
            if locked:
                lock.release()
            if started is not None:
                state.gate.release(started)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
