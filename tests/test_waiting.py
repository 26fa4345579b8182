"""tests.waiting.until: the one condition wait of the tests."""

from __future__ import annotations

import asyncio

import pytest

from tests.waiting import until


async def test_a_condition_already_true_returns_at_once() -> None:
    calls: list[int] = []

    def holds() -> bool:
        calls.append(1)
        return True

    assert await until(holds)
    assert calls == [1]


async def test_waits_for_another_task_to_bring_the_condition_about() -> None:
    done = asyncio.Event()

    async def later() -> None:
        for _ in range(10):
            await asyncio.sleep(0)
        done.set()

    task = asyncio.create_task(later())
    assert await until(done.is_set)
    await task


async def test_an_async_predicate_is_awaited() -> None:
    answers = iter([False, False, True])

    async def third_time() -> bool:
        return next(answers)

    assert await until(third_time, interval_s=0.001)
    assert next(answers, None) is None  # asked exactly three times


async def test_false_once_the_deadline_passes() -> None:
    asked: list[int] = []

    def never() -> bool:
        asked.append(1)
        return False

    assert not await until(never, timeout_s=0.05, interval_s=0.01)
    assert len(asked) >= 1


async def test_a_slow_async_predicate_is_cancelled_at_the_deadline() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> bool:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    assert not await until(hangs, timeout_s=0.05)
    assert cancelled.is_set()


async def test_the_predicates_own_timeout_error_is_not_mistaken_for_the_deadline() -> None:
    async def times_out() -> bool:
        await asyncio.wait_for(asyncio.sleep(3600), 0.001)
        return True

    with pytest.raises(TimeoutError):
        await until(times_out, timeout_s=60)
