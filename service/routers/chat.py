"""POST /v1/chat/completions: OpenAI-compatible answers over a collection, with citations.

The last user message is the question; system messages and earlier turns are not used (the system
text is part of the cached prompt prefix, so every passage cache stays valid). Extension fields:
`collection`, `k`, `mode`, `filter`, `hybrid`, `repetition_penalty`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvrag.errors import KvragError
from kvrag.index.collection import Collection
from kvrag.rag.generation.sampling import SamplingParams
from kvrag.rag.generation.streaming import TokenEvent
from kvrag.rag.pipeline import RagAnswer, RagPipeline
from kvrag.service.deps import State
from kvrag.service.errors import ApiError, ClientGone, LimitExceeded, classify, scrub
from kvrag.service.routers.collections import check_k, check_query
from kvrag.service.schemas import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    Citation,
    Usage,
)
from kvrag.service.state import AppState
from kvrag.service.work import model_work, run_model_work

router = APIRouter(tags=["chat"])
log = logging.getLogger("kvrag.service")
MIN_TEMPERATURE = 1e-3


def _question(body: ChatRequest) -> str:
    for m in reversed(body.messages):
        if m.role == "user":
            if isinstance(m.content, str):
                return m.content
            if isinstance(m.content, list):
                parts = []
                for p in m.content:
                    if isinstance(p, dict) and p.get("type") == "text":
                        if not isinstance(p.get("text"), str):
                            raise ApiError(422, "a text content part needs a string `text`")
                        parts.append(p["text"])
                if parts:
                    return "\n".join(parts)
            raise ApiError(422, "the last user message has no text content")
    raise ApiError(422, "messages has no user message: the last user message is the question")


def _pipeline(state: AppState, c: Collection) -> RagPipeline:
    s = state.settings
    return RagPipeline(
        c,
        state.encoder(c.config.encoder),
        state.generator,
        state.kv,
        ape_temperature=s.ape_temperature,
        ape_scale=s.ape_scale,
        blend_ratio=s.blend_ratio,
    )


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


def _answer_events(state: AppState, name: str, question: str, kwargs: dict):
    """`produce` for `model_work`: the pipeline's token events and answer, holding the collection
    and its lock in the worker, stopping between tokens once the client is gone."""

    def produce(stop: threading.Event) -> Iterator[TokenEvent | RagAnswer]:
        with state.lease(name) as lease, state.locked(lease, stop) as c:
            it = _pipeline(state, c).stream(question, **kwargs)
            try:
                for item in it:
                    if stop.is_set():
                        return
                    yield item
            finally:
                it.close()

    return produce


@router.post("/v1/chat/completions", response_model=ChatResponse)
async def chat_completions(body: ChatRequest, state: State, request: Request):
    question = _question(body)
    check_query(state, question, "the question")
    check_k(state, body.k)
    sampling = _sampling(state, body)
    name = body.collection or state.settings.default_collection
    if not name:
        raise ApiError(422, "collection is required (or set KVRAG_DEFAULT_COLLECTION on the server)")
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
        items = await run_model_work(
            state.gate, _answer_events(state, name, question, kwargs), receive=request.receive
        )
        answer = items[-1] if items else None
        if not isinstance(answer, RagAnswer):
            raise ClientGone()
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

    # Streaming: a full queue, a missing collection or a bad filter is still a plain 503, 404 or 422
    # before the 200 goes out.
    state.gate.check()
    with state.lease(name) as lease:
        c = lease.collection
        if body.filter:
            await run_in_threadpool(c.store.filter_ids, body.filter)

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
        # Starlette cancels this generator when the client disconnects: `model_work` then stops the
        # worker and gives the slot and the collection back from it; nothing here awaits cleanup.
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for item in model_work(state.gate, _answer_events(state, name, question, kwargs)):
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
            message = scrub(message, state.home)
            yield f"data: {json.dumps({'error': {'message': message, 'type': type_}})}\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
