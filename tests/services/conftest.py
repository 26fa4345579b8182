"""Fixtures of the attention and expert service tests."""

from __future__ import annotations

from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor

import pytest


@pytest.fixture
def thread() -> Generator[ThreadPoolExecutor, None, None]:
    """A one-thread executor: the compute thread of a ``DirectRunner`` under test."""
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)
