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
real file besides the loop's wake-up pipe is watched (or that pipe was written), no debug checks per
handle (debug mode falls back to the stdlib's iteration). Its timers are a heap of ``(when, timer)``
tuples, compared in C (``_Timer`` says why the order is the stdlib's), and its ready handles run inline,
iteration after iteration within one ``_run_once`` call until the loop is asked to stop.

``run(main)`` runs a coroutine on a fresh virtual loop with ``asap.clock`` reading the virtual clock, so
the services' own duration stamps are virtual too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import heapq
import selectors
from asyncio import events, format_helpers
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

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


class _Timer(events.TimerHandle):
    """A ``TimerHandle`` made field by field (``VirtualLoop.call_at``), kept in the loop's heap as a
    ``(when, timer)`` tuple: the heap compares the floats in C, not ``TimerHandle.__lt__`` in Python.

    A tie on ``when`` then compares the timers: equality by identity (``TimerHandle.__eq__`` would compare
    callbacks and arguments, tensors among them) and ``<`` by ``when``, which is False. Every comparison
    the heap makes thus answers as ``TimerHandle.__lt__`` does, so the heap pops the timers in the same
    order as the stdlib's heap of handles."""

    __slots__ = ()

    __hash__ = events.TimerHandle.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


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


_NOT_DEBUG = bool  # ``bool()`` is False: the loop's ``get_debug`` without a Python frame
_DEBUG = functools.partial(bool, 1)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time (see the module doc). ``now`` starts at 0."""

    def __init__(self) -> None:
        self.now = 0.0
        self.iterations = 0
        """Loop iterations so far (each runs every callback that was ready): the simulator's events."""
        self._woken = False
        self._timers: list[tuple[float, Any]] = []  # (when, _Timer); Any: the stdlib's private fields
        """The lean path's timers (``call_at``): a heap of ``(when, timer)``; debug mode uses the stdlib's
        ``_scheduled`` heap of handles instead (``set_debug`` moves them over)."""
        super().__init__(selector=_VirtualSelector(self))
        # Every future and task asks its loop ``get_debug()`` when made, and ``create_future`` is called
        # per sleep and per executor call: both as C callables, not Python methods (same answers).
        self.__dict__["create_future"] = functools.partial(asyncio.Future, loop=self)

    def time(self) -> float:
        return self.now

    def _write_to_self(self) -> None:
        """The wake-up pipe is written (``call_soon_threadsafe``): the next clock advance polls it."""
        self._woken = True
        super()._write_to_self()  # type: ignore[misc]

    def set_debug(self, enabled: bool) -> None:
        """As the stdlib's; the pending timers move to the heap the new mode's iteration reads."""
        base: Any = self
        was = getattr(base, "_debug", False)  # unset while the stdlib's __init__ calls this
        super().set_debug(enabled)
        self.__dict__["get_debug"] = _DEBUG if enabled else _NOT_DEBUG
        if enabled and not was and self._timers:
            # The same order relation (``_Timer``): a heap of tuples is a heap of their timers.
            base._scheduled = [timer for _, timer in self._timers]
            self._timers = []
        elif was and not enabled and base._scheduled:
            self._timers = [(timer._when, timer) for timer in base._scheduled]
            heapq.heapify(self._timers)
            base._scheduled = []

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None
    ) -> Any:
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
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> Any:
        """``call_later`` as the stdlib computes it (``time() + delay``), through the lean ``call_at``."""
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(self.now + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> Any:
        """``call_at`` without the debug checks, into the tuple heap (``_Timer``)."""
        base: Any = self
        if base._debug or base._closed or when is None:
            return super().call_at(when, callback, *args, context=context)
        timer: Any = _Timer.__new__(_Timer)
        timer._context = context if context is not None else contextvars.copy_context()
        timer._loop = self
        timer._callback = callback
        timer._args = args
        timer._cancelled = False
        timer._repr = None
        timer._source_traceback = None
        timer._when = when
        timer._scheduled = True
        heapq.heappush(self._timers, (when, timer))
        return timer

    def _run_once(self) -> None:
        """Iterations as ``BaseEventLoop._run_once`` runs one, on the virtual clock (module doc), until the
        loop is asked to stop (``run_forever`` checks ``_stopping`` after each of its ``_run_once`` calls,
        this checks it after each iteration: the same iterations, without a call and the loop's fields
        read anew for each). Each ready handle runs as ``Handle._run`` would run it, inline."""
        base: Any = self
        if base._debug:
            super()._run_once()  # type: ignore[misc]
            return
        ready = base._ready
        selector = base._selector
        fd_to_key = selector._fd_to_key
        resolution = base._clock_resolution
        popleft = ready.popleft
        heappop = heapq.heappop
        while True:
            timers: list[tuple[float, Any]] = self._timers
            count = len(timers)
            if count > _MIN_SCHEDULED and base._timer_cancelled_count / count > _MIN_CANCELLED_FRACTION:
                kept = []
                for entry in timers:
                    if entry[1]._cancelled:
                        entry[1]._scheduled = False
                    else:
                        kept.append(entry)
                heapq.heapify(kept)
                self._timers = timers = kept
                base._timer_cancelled_count = 0
            else:
                while timers and timers[0][1]._cancelled:
                    base._timer_cancelled_count -= 1
                    heappop(timers)[1]._scheduled = False
            if ready or base._stopping:
                self.iterations += 1
                if len(fd_to_key) > 1:  # real files watched: poll them, never block
                    base._process_events(selectors.DefaultSelector.select(selector, 0))
            elif timers:
                timeout = min(max(0.0, timers[0][0] - self.now), _MAXIMUM_SELECT_TIMEOUT)
                if len(fd_to_key) > 1 or self._woken:
                    self._woken = False
                    base._process_events(selector.select(timeout))
                else:
                    # Only the loop's wake-up pipe is watched and nothing was written to it since the
                    # last poll (``_write_to_self``): nothing to poll, the clock advances.
                    self.iterations += 1
                    if timeout > 0:
                        self.now += timeout
            else:
                base._process_events(selector.select(None))
            end_time = self.now + resolution
            while timers and timers[0][0] < end_time:
                timer = heappop(timers)[1]
                timer._scheduled = False
                ready.append(timer)
            for _ in range(len(ready)):
                handle = popleft()
                if handle._cancelled:
                    continue
                try:
                    handle._context.run(handle._callback, *handle._args)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._report(handle, exc)
            handle = None  # as ``Handle._run``: no reference kept to the last callback
            if base._stopping or base._debug:
                return

    def _report(self, handle: Any, exc: BaseException) -> None:
        """What ``Handle._run`` does with a callback's exception: the loop's exception handler."""
        callback = format_helpers._format_callback_source(handle._callback, handle._args)  # type: ignore[attr-defined]
        context: dict[str, Any] = {
            "message": f"Exception in callback {callback}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

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
