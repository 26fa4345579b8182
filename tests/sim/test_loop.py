"""The virtual clock: time jumps to the next timer, asap.clock follows it, deadlocks are reported."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from asap import clock
from asap.errors import InternalError
from asap.sim.loop import SimulationStalled, VirtualLoop, run


def test_sleeps_take_virtual_time_only() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            seen.append((name, loop.time()))

        await asyncio.gather(sleeper("long", 3600.0), sleeper("short", 0.25), sleeper("mid", 60.0))
        return seen

    seen, loop = run(main())
    assert seen == [("short", 0.25), ("mid", 60.0), ("long", 3600.0)]
    assert loop.now == 3600.0 and loop.iterations > 0


def test_call_at_and_timeouts_are_honoured_exactly() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        loop.call_at(12.5, fired.set_result, None)
        await fired
        at = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.create_future(), 7.0)
        return at, loop.time()

    (at, after), _ = run(main())
    assert at == 12.5 and after == 19.5


def test_asap_clock_reads_the_virtual_clock_inside_run_only() -> None:
    async def main() -> tuple[float, int, float]:
        await asyncio.sleep(2.0)
        return clock.monotonic(), clock.monotonic_ns(), clock.perf_counter()

    (seconds, nanos, perf), _ = run(main())
    assert (seconds, nanos, perf) == (2.0, 2_000_000_000, 2.0)
    assert abs(clock.monotonic() - time.monotonic()) < 1.0  # back to the real clock


def test_a_deadlock_is_reported_not_hung() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nothing will ever set it

    with pytest.raises(SimulationStalled):
        run(main())


def test_real_executors_are_refused() -> None:
    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0)

    with pytest.raises(InternalError, match="real executor"):
        run(main())


def test_the_loop_never_goes_back() -> None:
    loop = VirtualLoop()
    try:
        loop.advance(5.0)
        loop.advance(-1.0)
        assert loop.time() == 5.0
    finally:
        loop.close()


def _trace_of_a_busy_system(debug: bool) -> tuple[list[tuple[float, str]], int]:
    """Tasks, queues, timers (some cancelled), callbacks and futures interleaved at equal and distinct
    virtual times; the order everything happened in, and the loop's iteration count."""
    seen: list[tuple[float, str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_debug(debug)
        queue: asyncio.Queue[int | None] = asyncio.Queue()

        def note(what: str) -> None:
            seen.append((loop.time(), what))

        async def producer(name: str, gaps: list[float]) -> None:
            for i, gap in enumerate(gaps):
                await asyncio.sleep(gap)
                seen.append((loop.time(), f"{name} put {i}"))
                queue.put_nowait(i)
                loop.call_soon(note, f"{name} soon {i}")

        async def consumer() -> None:
            while (item := await queue.get()) is not None:
                done = loop.create_future()
                loop.call_later(0.5 * (item % 3), done.set_result, item)
                seen.append((loop.time(), f"got {item} -> {await done}"))

        for delay in (0.25, 0.5, 0.75):
            loop.call_later(delay, note, f"timer {delay}").cancel()
        for delay in (0.3, 0.3, 1.0):
            loop.call_later(delay, note, f"timer {delay}")
        work = asyncio.gather(consumer(), consumer())
        await asyncio.gather(producer("a", [0.1, 0.0, 0.2, 0.2]), producer("b", [0.1, 0.1, 0.0, 0.3]))
        queue.put_nowait(None)
        queue.put_nowait(None)
        await work

    _, loop = run(main())
    return seen, loop.iterations


def test_the_lean_iteration_keeps_the_stdlib_order() -> None:
    # Debug mode runs the stdlib's own iteration and call_soon (``VirtualLoop._run_once``): same order.
    lean, lean_iterations = _trace_of_a_busy_system(debug=False)
    stdlib, stdlib_iterations = _trace_of_a_busy_system(debug=True)
    assert lean == stdlib and lean_iterations == stdlib_iterations
    assert len(lean) > 20


def test_timers_pending_across_a_debug_switch_keep_their_order() -> None:
    # The lean path keeps timers in a heap of tuples, debug mode in the stdlib's heap of handles:
    # switching moves them over, in both directions, without losing or reordering any.
    async def main() -> list[tuple[float, int]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[float, int]] = []

        def fire(i: int) -> None:
            fired.append((loop.time(), i))

        for i, delay in enumerate((3.0, 1.0, 2.0, 1.0, 5.0, 4.0)):
            loop.call_later(delay, fire, i)
        loop.call_later(0.5, loop.set_debug, True)
        loop.call_later(2.5, loop.set_debug, False)
        loop.call_later(3.5, loop.set_debug, True)
        await asyncio.sleep(6.0)
        loop.set_debug(False)
        return fired

    fired, _ = run(main())
    assert [t for t, _ in fired] == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [i for _, i in fired][2:] == [2, 0, 5, 4]


def test_a_failing_callback_goes_to_the_exception_handler() -> None:
    seen: list[dict[str, object]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: seen.append(context))

        def fail() -> None:
            raise ValueError("boom")

        loop.call_soon(fail)
        loop.call_later(1.0, fail)
        await asyncio.sleep(2.0)

    run(main())
    assert [type(c["exception"]) for c in seen] == [ValueError, ValueError]
    assert all(str(c["message"]).startswith("Exception in callback") for c in seen)
