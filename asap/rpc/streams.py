"""The shape every ASAP bidirectional-streaming handler shares.

A handler reads its request stream in a producer task (which may start a task per item) and answers
in completion order through a queue; the handler itself is an async generator, as grpc.aio needs (and as
the aio interceptor limitation in docs/architecture.md §8 requires). ``relay`` runs the producer, yields what it
queues until it queues ``None``, re-raises its failure, and cancels it (and so its children) when the
client goes away. ``answer_each`` is the producer of the handlers that answer every request on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
Req = TypeVar("Req")


async def relay(
    produce: Callable[[asyncio.Queue[T | None]], Coroutine[Any, Any, None]],
    *,
    name: str,
    outbound: asyncio.Queue[T | None] | None = None,
) -> AsyncIterator[T]:
    """Yield the items ``produce(outbound)`` puts on ``outbound`` (a new queue unless given) until it
    puts ``None``."""
    outbound = asyncio.Queue() if outbound is None else outbound
    producer = asyncio.create_task(produce(outbound), name=name)
    try:
        while True:
            getter = asyncio.ensure_future(outbound.get())
            done, _ = await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                exc = producer.exception()
                if exc is not None:
                    raise exc
                continue  # the producer finished; its closing None is queued
            item = getter.result()
            if item is None:
                break
            yield item
    finally:
        producer.cancel()


async def cancel_all(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` (tasks, or futures that stand for work) and wait until they are done (used by
    producers when they are cancelled)."""
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)


async def answer_each(
    requests: AsyncIterator[Req],
    answer: Callable[[Req], Coroutine[Any, Any, T]],
    outbound: asyncio.Queue[T | None],
    *,
    task_name: Callable[[Req], str] | None = None,
    also_track: set[asyncio.Task[None]] | None = None,
) -> None:
    """Answer every request of the stream in a task of its own, queueing answers as they complete, and
    ``None`` once the stream has ended and every answer is queued. ``also_track`` is a set the tasks also
    join while they run (a servicer's in-flight work). Cancelled (the client went away), it cancels the
    tasks: their requests are abandoned."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        await outbound.put(await answer(request))

    try:
        async for request in requests:
            task = asyncio.create_task(one(request), name=None if task_name is None else task_name(request))
            for group in (tasks,) if also_track is None else (tasks, also_track):
                group.add(task)
                task.add_done_callback(group.discard)
        if tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        await outbound.put(None)
    except asyncio.CancelledError:
        await cancel_all(tasks)
        raise
