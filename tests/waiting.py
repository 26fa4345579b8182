"""Waiting for a condition in tests: poll a predicate until it holds or a deadline passes.

Tests wait for the thing they need (a rank marked down, a server draining, a barrier holding a group),
never for a fixed time: a fixed sleep is too short on a loaded host (a flake) and too long everywhere
else. ``until`` returns whether the condition came true, so the caller's assertion keeps its message:
``assert await until(lambda: not state.busy, timeout_s=10), "still busy"``. Synchronous tests call it
through ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 10.0, interval_s: float = 0.0
) -> bool:
    """True as soon as ``predicate()`` (a plain or an async function) is true, checked every
    ``interval_s`` (0: every turn of the event loop, for conditions other tasks of this loop bring
    about); False if it is still false after ``timeout_s``, a call in progress then being cancelled."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            while True:
                outcome = predicate()
                if inspect.isawaitable(outcome):
                    outcome = await outcome
                if outcome:
                    return True
                await asyncio.sleep(interval_s)
    except TimeoutError:
        if deadline.expired():
            return False
        raise  # the predicate's own timeout, not ours
