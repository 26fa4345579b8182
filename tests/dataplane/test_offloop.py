"""``on_thread``: a cancellation of the awaiting task waits for the thread's work to end, then propagates."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from asap.dataplane.offloop import on_thread


async def _cancel_while_running(cancels: int, fail: bool) -> tuple[list[str], asyncio.Task[str]]:
    entered, release = threading.Event(), threading.Event()
    events: list[str] = []

    def work() -> str:
        entered.set()
        release.wait(30)
        events.append("work ended")
        if fail:
            raise ValueError("work failed")
        return "done"

    with ThreadPoolExecutor(max_workers=1) as pool:
        task = asyncio.create_task(on_thread(pool, work))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.01)
        assert not task.done()  # held until the work returns
        events.append("released")
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        events.append("cancelled")
    return events, task


@pytest.mark.parametrize("cancels", [1, 3])
@pytest.mark.parametrize("fail", [False, True])
async def test_a_cancellation_waits_for_the_work_then_propagates(cancels: int, fail: bool) -> None:
    events, task = await _cancel_while_running(cancels, fail)
    assert events == ["released", "work ended", "cancelled"]
    assert task.cancelled()


async def test_result_and_error_pass_through() -> None:
    def boom() -> None:
        raise ValueError("boom")

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert await on_thread(pool, lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="boom"):
            await on_thread(pool, boom)
