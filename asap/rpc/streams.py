"""The shape every ASAP bidirectional-streaming handler shares.

A handler reads its request stream in a producer task (which may start a task per item) and answers
in completion order through a queue; the handler itself is an async generator, as grpc.aio needs (and as
the aio interceptor limitation in docs/architecture.md §8 requires). ``relay`` runs the producer, yields what it
queues until it queues ``None``, re-raises its failure, and cancels it (and so its children) when the
client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they are done (used by producers when they are cancelled)."""
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)
