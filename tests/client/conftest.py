"""Fixtures: the fake scheduler on port 0, on the test's loop (async tests) or in a thread (sync code)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.client.fake_scheduler import FakeScheduler, FakeSchedulerThread, start_fake_scheduler


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeScheduler, str]]:
    """A fake scheduler on the test's event loop: ``(servicer, target)``."""
    servicer = FakeScheduler()
    handle, target = await start_fake_scheduler(servicer)
    try:
        yield servicer, target
    finally:
        await handle.server.stop(None)


@pytest.fixture
def fake_thread() -> Iterator[FakeSchedulerThread]:
    """A fake scheduler on its own loop thread, for tests written as plain sync code."""
    with FakeSchedulerThread() as served:
        yield served
