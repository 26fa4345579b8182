"""Fixtures: the client tests' fake scheduler, served on the test's loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.client.fake_scheduler import FakeScheduler, start_fake_scheduler


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeScheduler, str]]:
    """``(servicer, target)`` of a fake scheduler on port 0."""
    servicer = FakeScheduler()
    handle, target = await start_fake_scheduler(servicer)
    try:
        yield servicer, target
    finally:
        await handle.server.stop(None)
