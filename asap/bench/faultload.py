"""Load with faults in the middle: what each call got, and the figures of one injected fault.

The reliability contract (DESIGN §12) asks of a killed or frozen rank under load: calls that needed it
fail typed (UNAVAILABLE) within a bound, the others complete, no call hangs past its deadline, every call
is answered. ``open_loop`` sends Poisson arrivals and records each call's fate, guarding every call with
its deadline plus a margin so that a hang shows up as a record instead of hanging the harness;
``summarize`` turns the records and the fault's times into those figures. ``benchmarks/faults.py`` and the
fault tests (``tests/e2e/test_faults_load.py``) share them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from asap.client import PrefillResult
from asap.errors import AsapError

OK = "OK"
HANG = "HANG"
"""A call that got no answer at all by its deadline plus ``HANG_MARGIN_S`` (the harness gave up on it)."""
UNTYPED = "UNTYPED"
"""A call that ended with something other than an ``AsapError`` (a bug: errors must be typed)."""
HANG_MARGIN_S = 2.0


class Prefiller(Protocol):
    async def prefill(
        self, *, tokens: Sequence[int] | None = None, timeout_s: float | None = None
    ) -> PrefillResult: ...


@dataclass(slots=True)
class Call:
    """One call; times in ``time.monotonic()`` seconds."""

    start: float
    end: float = 0.0
    status: str = ""
    rank: int = -1
    """The attention rank that answered (successful calls)."""
    message: str = ""


@dataclass(slots=True)
class Load:
    """The calls of an ``open_loop`` run (appended as they start, so a fault can be timed against them)."""

    calls: list[Call] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[Call]:
        """Calls that started in [start, end)."""
        return [c for c in self.calls if start <= c.start < end]


async def one_call(client: Prefiller, tokens: list[int], deadline_s: float, call: Call) -> None:
    """Run one prefill into ``call``; never raises, never outlives ``deadline_s + HANG_MARGIN_S``."""
    try:
        async with asyncio.timeout(deadline_s + HANG_MARGIN_S):
            result = await client.prefill(tokens=tokens, timeout_s=deadline_s)
        call.status, call.rank = OK, result.attention_rank
    except TimeoutError:
        call.status = HANG
    except AsapError as exc:
        call.status, call.message = exc.code, exc.message[:200]
    except Exception as exc:
        call.status, call.message = UNTYPED, repr(exc)[:200]
    call.end = time.monotonic()


async def open_loop(
    client: Prefiller,
    rate: float,
    until: Callable[[], bool],
    *,
    prompt: Callable[[random.Random], list[int]],
    deadline_s: float = 30.0,
    seed: int = 0,
    load: Load | None = None,
) -> Load:
    """Poisson arrivals at ``rate`` per second until ``until()`` is true, then wait for every call."""
    rng = random.Random(seed)
    load = load if load is not None else Load()
    tasks: list[asyncio.Task[None]] = []
    while not until():
        call = Call(start=time.monotonic())
        load.calls.append(call)
        tasks.append(asyncio.create_task(one_call(client, prompt(rng), deadline_s, call)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return load


@dataclass(slots=True)
class FaultFigures:
    """The figures of one fault: the calls around it and what became of them."""

    calls: int
    ok: int
    affected: int
    """Calls that failed (any status but OK)."""
    unavailable: int
    max_time_to_failure_s: float
    """Over failed calls: the end minus the later of its start and the fault (0 when none failed)."""
    lost: int
    """Calls without an answer (HANG) or with an untyped error: must be 0."""
    hangs: int
    """Calls that ran into their deadline (HANG or DEADLINE_EXCEEDED): must be 0."""
    failed_outside: int
    """Failures of calls that started before the fault or after the recovery settled: must be 0."""
    max_stall_s: float
    """Over calls in flight at the fault that still succeeded: the end minus the fault (how long a
    frozen rank held calls it did not fail)."""
    statuses: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


def summarize(load: Load, *, fault_at: float, before_from: float, settled_at: float) -> FaultFigures:
    """Figures of the calls that started at or after ``before_from``: failures are expected only of calls
    that were in flight at ``fault_at`` or started before ``settled_at`` (the rank back and taken in)."""
    calls = [c for c in load.calls if c.start >= before_from]
    failed = [c for c in calls if c.status != OK]
    statuses: dict[str, int] = {}
    for c in calls:
        statuses[c.status] = statuses.get(c.status, 0) + 1
    outside = [c for c in failed if c.end < fault_at or c.start >= settled_at]
    return FaultFigures(
        calls=len(calls),
        ok=len(calls) - len(failed),
        affected=len(failed),
        unavailable=statuses.get("UNAVAILABLE", 0),
        max_time_to_failure_s=max((c.end - max(c.start, fault_at) for c in failed), default=0.0),
        lost=sum(c.status in (HANG, UNTYPED) for c in calls),
        hangs=sum(c.status in (HANG, "DEADLINE_EXCEEDED") for c in calls),
        failed_outside=len(outside),
        max_stall_s=max(
            (c.end - fault_at for c in calls if c.status == OK and c.start <= fault_at <= c.end), default=0.0
        ),
        statuses=statuses,
    )


__all__ = ["HANG", "OK", "UNTYPED", "Call", "FaultFigures", "Load", "one_call", "open_loop", "summarize"]
