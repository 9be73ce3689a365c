"""Model work in a worker thread that stops when its client goes away, and frees its slot only then.

A request's model work (retrieval, prefill, decoding) runs in a worker thread; the event loop only
passes its items on. However the request ends (the answer is complete, an error, a streaming
client that disconnects and has its response cancelled, or a non-streaming client that hangs up)
the worker is told to stop at its next step, and the model slot and the collection are given back
from the worker itself once it has stopped: never before (model work never exceeds the slots),
never not at all (no cleanup awaits inside a cancelled scope).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.types import Receive

from kvrag.service.gate import ModelGate

_ITEM, _END, _ERROR = range(3)


async def _watch_disconnect(receive: Receive, stop: threading.Event) -> None:
    """Set `stop` when the client disconnects (the request body must already have been read)."""
    while not stop.is_set():
        message = await receive()
        if message["type"] == "http.disconnect":
            stop.set()
            return


async def model_work(
    gate: ModelGate,
    produce: Callable[[threading.Event], Iterator[Any]],
    *,
    receive: Receive | None = None,
) -> AsyncIterator[Any]:
    """Take a model slot, run `produce(stop)` in a worker thread and yield its items as they come.

    `produce` should end soon after `stop` is set (it is checked between its items too). `receive`
    (a request whose body was read, not streamed back) lets a client that hangs up stop the work.
    Whatever `produce` holds (a collection, its lock) it takes and gives back itself, in the worker.
    """
    ticket = await gate.acquire()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(kind: int, value: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def worker() -> None:
        try:
            it = produce(stop)
            try:
                for item in it:
                    if stop.is_set():
                        break
                    post(_ITEM, item)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            post(_END)
        except BaseException as exc:  # handed to the consumer, if it is still there
            post(_ERROR, exc)
        finally:
            # the consumer releases the slot when it reads the end; this is for a consumer that is
            # gone (a cancelled stream). Releasing twice is a no-op.
            try:
                loop.call_soon_threadsafe(gate.release, ticket)
            except RuntimeError:  # the loop is closed: nothing else can touch the gate now
                gate.release(ticket)

    watcher = asyncio.ensure_future(_watch_disconnect(receive, stop)) if receive is not None else None
    try:
        loop.run_in_executor(None, worker)
    except BaseException:
        if watcher is not None:
            watcher.cancel()
        gate.release(ticket)
        raise
    try:
        while True:
            kind, value = await queue.get()
            if kind == _ITEM:
                yield value
                continue
            gate.release(ticket)  # the worker has finished its model work
            if kind == _END:
                return
            raise value
    finally:
        # no await here: this runs inside a cancelled scope when a streaming client disconnects
        stop.set()
        if watcher is not None:
            watcher.cancel()


async def run_model_work(
    gate: ModelGate,
    produce: Callable[[threading.Event], Iterator[Any]],
    *,
    receive: Receive | None = None,
) -> list[Any]:
    """`model_work` collected into a list (for answers that are not streamed)."""
    return [item async for item in model_work(gate, produce, receive=receive)]
