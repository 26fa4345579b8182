"""A virtual clock for asyncio: an event loop whose time jumps to the next timer when nothing is ready.

``VirtualLoop`` is the stdlib selector loop with two changes: ``time()`` returns virtual seconds (from 0),
and when the loop would block waiting for its next timer it advances the virtual clock to that timer
instead (the selector is still polled, without blocking, so real file descriptors keep working). Every
``asyncio.sleep``, ``wait_for`` timeout and ``call_at`` of the code it runs is therefore honoured exactly
and costs no wall time: modelled compute and transfers (``asap.sim.devices``) become timed waits.

With no timer and nothing ready, a real loop would wait for I/O forever; here that means every task
waits on something that can never happen, so the loop raises ``SimulationStalled`` rather than hang.

Speed: a simulation is millions of loop iterations, most of them one or two callbacks, so the loop's own
bookkeeping shows. ``VirtualLoop`` therefore runs its iterations itself (``_run_once``) and makes its
handles itself (``call_soon``), in the stdlib's order exactly (same callbacks, same iterations, same
timer arithmetic: results do not move), without what only a real clock needs: no selector call unless a
real file besides the loop's wake-up pipe is watched, no debug checks per handle (debug mode falls back
to the stdlib's iteration).

``run(main)`` runs a coroutine on a fresh virtual loop with ``asap.clock`` reading the virtual clock, so
the services' own duration stamps are virtual too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import heapq
import selectors
from asyncio import events
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from asap import clock
from asap.errors import InternalError

__all__ = ["SimulationStalled", "VirtualLoop", "run"]

T = TypeVar("T")


class SimulationStalled(InternalError):
    """The simulated system deadlocked: nothing is ready and no timer is pending."""


_MIN_SCHEDULED: int = asyncio.base_events._MIN_SCHEDULED_TIMER_HANDLES  # type: ignore[attr-defined]
_MIN_CANCELLED_FRACTION: float = asyncio.base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION  # type: ignore[attr-defined]
_MAXIMUM_SELECT_TIMEOUT: float = asyncio.base_events.MAXIMUM_SELECT_TIMEOUT  # type: ignore[attr-defined]


class _Handle(events.Handle):
    """A ``Handle`` made field by field (``VirtualLoop.call_soon``): no debug lookup per callback."""

    __slots__ = ()


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without blocking; a wait for the next timer advances the loop's virtual clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._loop.iterations += 1
        if timeout == 0 and len(self.get_map()) <= 1:
            # Callbacks are ready and no file but the loop's own wake-up pipe is watched: the poll (a
            # system call per iteration) can wait for the next iteration that would advance the clock.
            return []
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise SimulationStalled("virtual clock: nothing is ready and no timer is pending (deadlock)")
        self._loop.advance(timeout)
        return events


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time (see the module doc). ``now`` starts at 0."""

    def __init__(self) -> None:
        self.now = 0.0
        self.iterations = 0
        """Loop iterations so far (each runs every callback that was ready): the simulator's events."""
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self.now

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.Handle:
        """``call_soon`` without the debug checks (``BaseEventLoop.call_soon`` keeps them in debug mode)."""
        base: Any = self  # the stdlib loop's private fields, read as it reads them
        if base._debug or base._closed:
            return super().call_soon(callback, *args, context=context)
        handle: Any = _Handle.__new__(_Handle)
        handle._context = context if context is not None else contextvars.copy_context()
        handle._loop = self
        handle._callback = callback
        handle._args = args
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        base._ready.append(handle)
        return cast(asyncio.Handle, handle)

    def _run_once(self) -> None:
        """One iteration, as ``BaseEventLoop._run_once`` runs it, on the virtual clock (module doc)."""
        base: Any = self
        if base._debug:
            super()._run_once()  # type: ignore[misc]
            return
        scheduled: list[Any] = base._scheduled
        ready = base._ready
        count = len(scheduled)
        if count > _MIN_SCHEDULED and base._timer_cancelled_count / count > _MIN_CANCELLED_FRACTION:
            kept = []
            for timer in scheduled:
                if timer._cancelled:
                    timer._scheduled = False
                else:
                    kept.append(timer)
            heapq.heapify(kept)
            base._scheduled = scheduled = kept
            base._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                base._timer_cancelled_count -= 1
                timer = heapq.heappop(scheduled)
                timer._scheduled = False
        selector = base._selector
        if ready or base._stopping:
            self.iterations += 1
            if len(selector._fd_to_key) > 1:  # real files watched: poll them, never block
                base._process_events(selectors.DefaultSelector.select(selector, 0))
        elif scheduled:
            timeout = min(max(0.0, scheduled[0]._when - self.now), _MAXIMUM_SELECT_TIMEOUT)
            base._process_events(selector.select(timeout))
        else:
            base._process_events(selector.select(None))
        end_time = self.now + base._clock_resolution
        while scheduled:
            if scheduled[0]._when >= end_time:
                break
            timer = heapq.heappop(scheduled)
            timer._scheduled = False
            ready.append(timer)
        popleft = ready.popleft
        for _ in range(len(ready)):
            handle = popleft()
            if handle._cancelled:
                continue
            handle._run()

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward (never back)."""
        if seconds > 0:
            self.now += seconds

    def run_in_executor(  # type: ignore[override]
        self, executor: concurrent.futures.Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Executors of the simulation (``asap.sim.devices``) run ``func`` on virtual time; any other
        executor would run on real threads, whose completion the virtual clock cannot wait for."""
        schedule = getattr(executor, "schedule", None)
        if schedule is None:
            raise InternalError(
                f"virtual clock: {func!r} was sent to a real executor ({executor!r}); the simulation "
                "injects virtual devices for every compute and codec executor"
            )
        future: asyncio.Future[T] = schedule(self, func, *args)
        return future


def run(main: Coroutine[Any, Any, T]) -> tuple[T, VirtualLoop]:
    """Run ``main`` to completion on a fresh ``VirtualLoop`` (``asap.clock`` reads it meanwhile); returns
    its result and the loop (closed; its ``now`` and ``iterations`` say how far it went)."""
    loop = VirtualLoop()
    try:
        with clock.use(loop.time):
            result = loop.run_until_complete(main)
            loop.run_until_complete(loop.shutdown_asyncgens())
        return result, loop
    finally:
        loop.close()
