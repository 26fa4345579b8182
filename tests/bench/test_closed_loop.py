"""Closed-loop load (``asap.bench.closed_loop``) against a fake client."""

from __future__ import annotations

from asap.bench.closed_loop import run_closed_loop
from tests.bench.test_runner import SlowClient


async def test_every_request_is_sent_once_after_the_unmeasured_warmup() -> None:
    client = SlowClient(delay_s=0.001)
    seconds, ttfts = await run_closed_loop(client, 7, 3, 5, warmup=2)
    assert len(client.calls) == 2 + 7 and ttfts == [0.5] * 7 and seconds > 0
