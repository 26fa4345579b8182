"""Work handed from the event loop to a thread, awaited to its end even when the awaiting task is cancelled.

A thread cannot be stopped: cancelling ``await loop.run_in_executor(...)`` only stops the waiting, while the
work goes on. When that work writes into slots the caller's clean-up frees (``finally: release``), the
clean-up would free them under the thread's feet — it would place rows into slots already given back, or
take slots after they were released and leave them taken for good. ``on_thread`` holds a cancellation
until the work has returned, and then re-raises it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

__all__ = ["on_thread"]

T = TypeVar("T")


async def on_thread(executor: Executor, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on ``executor``, awaited to its end. A cancellation of the awaiting task while ``fn``
    runs is re-raised once ``fn`` has returned (its result or error is then dropped); a second cancellation
    meanwhile changes nothing. Work the executor cancels before it started raises ``CancelledError`` at
    once."""
    job = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(job)
        except asyncio.CancelledError as exc:
            if job.done():  # the job itself was cancelled, or ended as the task was
                raise cancelled or exc from None
            cancelled = cancelled or exc
            continue
        except BaseException:
            if cancelled is not None:
                raise cancelled from None
            raise
        if cancelled is not None:
            raise cancelled
        return result
