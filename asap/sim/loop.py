"""A virtual clock for asyncio: an event loop whose time jumps to the next timer when nothing is ready.

``VirtualLoop`` is the stdlib selector loop with two changes: ``time()`` returns virtual seconds (from 0),
and when the loop would block waiting for its next timer it advances the virtual clock to that timer
instead (the selector is still polled, without blocking, so real file descriptors keep working). Every
``asyncio.sleep``, ``wait_for`` timeout and ``call_at`` of the code it runs is therefore honoured exactly
and costs no wall time: modelled compute and transfers (``asap.sim.devices``) become timed waits.

With no timer and nothing ready, a real loop would wait for I/O forever; here that means every task
waits on something that can never happen, so the loop raises ``SimulationStalled`` rather than hang.

``run(main)`` runs a coroutine on a fresh virtual loop with ``asap.clock`` reading the virtual clock, so
the services' own duration stamps are virtual too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from asap import clock
from asap.errors import InternalError

__all__ = ["SimulationStalled", "VirtualLoop", "run"]

T = TypeVar("T")


class SimulationStalled(InternalError):
    """The simulated system deadlocked: nothing is ready and no timer is pending."""


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
