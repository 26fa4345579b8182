"""``DirectRunner``, the compute thread's scheduler of hot-path batches, against fake links: results come
back in dispatch order, two batches interleave on the one thread, a failed dispatch fails its batch and
abandons the rest of the layer, a cancelled batch abandons what it posted and closes its generator, and
``Wake`` loses no wake-up."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import Unavailable
from asap.model.attention_part import MoERequest
from asap.model.placement import RankDispatch
from attention_svc.direct_runner import DirectBatch, DirectRunner

LAYERS = 3


class FakeLink:
    """Answers each dispatch with its rows + rank (from another thread), or holds it when ``hold``."""

    def __init__(self, rank: int, *, hold: bool = False, fail_layer: int | None = None) -> None:
        self.rank = rank
        self.hold = hold
        self.fail_layer = fail_layer
        self.posted: list[tuple[int, int]] = []
        self.abandoned: list[Ticket] = []
        self.held: list[Ticket] = []
        self.got_one = threading.Event()

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        self.posted.append(request.key)
        ticket.plane_data = request.key
        request.sent()
        if self.hold:
            self.held.append(ticket)
            self.got_one.set()
            return
        if request.layer == self.fail_layer:
            outcome: Any = Unavailable(f"rank {self.rank} broke")
        else:
            outcome = ExchangeResult(request.dispatch.hidden + self.rank)
        threading.Timer(0.001, ticket.settle, (outcome,)).start()

    def abandon(self, ticket: Ticket) -> None:
        self.abandoned.append(ticket)


def _gen(log: list[torch.Tensor]) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
    hidden = torch.zeros(2, 4)
    for layer in range(LAYERS):
        hidden = yield MoERequest(layer, hidden, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))
        log.append(hidden)
    return hidden


def _advance(gen: Any, previous: Any, hold: bool = False) -> Any:
    """Two expert ranks each get every row; the layer's output is the sum of their partials. The
    layer's ``rest`` (none here) is the runner's to finish: ``hold`` changes nothing."""
    try:
        request = next(gen) if previous is None else gen.send(sum(previous[2]))
    except StopIteration as stop:
        return stop.value
    dispatches = [
        RankDispatch(
            rank, torch.arange(2), request.hidden, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
        )
        for rank in (0, 1)
    ]
    return request, dispatches


async def test_batches_interleave_and_results_come_in_order(thread: ThreadPoolExecutor) -> None:
    runner = DirectRunner(thread, _advance)
    logs: list[list[torch.Tensor]] = [[], []]
    links = [FakeLink(0), FakeLink(1)]
    batches = [DirectBatch(mb, _gen(logs[mb]), links, lambda logits: logits.clone()) for mb in (0, 1)]
    results = await asyncio.wait_for(asyncio.gather(*(runner.run(b) for b in batches)), 30)
    for result, log in zip(results, logs, strict=True):
        # each layer adds rank 0 + rank 1 on top of twice the input: 0 -> 1 -> 3 -> 7
        assert [float(h[0, 0]) for h in log] == [1.0, 3.0, 7.0]
        assert torch.equal(result, log[-1])
    assert runner.most_active == 2
    assert sorted(links[0].posted) == sorted((mb, layer) for mb in (0, 1) for layer in range(LAYERS))


async def test_a_failed_dispatch_fails_its_batch_and_abandons_the_rest(thread: ThreadPoolExecutor) -> None:
    runner = DirectRunner(thread, _advance)
    held, failing = FakeLink(0, hold=True), FakeLink(1, fail_layer=0)
    batch = DirectBatch(5, _gen([]), [held, failing], lambda logits: logits)
    with pytest.raises(Unavailable, match="rank 1 broke"):
        await asyncio.wait_for(runner.run(batch), 30)
    assert held.abandoned == held.held  # the held dispatch of the failed layer was abandoned
    assert batch.gen.gi_frame is None  # the generator was closed


async def test_a_cancelled_batch_abandons_what_it_posted(thread: ThreadPoolExecutor) -> None:
    runner = DirectRunner(thread, _advance)
    links = [FakeLink(0, hold=True), FakeLink(1, hold=True)]
    batch = DirectBatch(6, _gen([]), links, lambda logits: logits)
    task = asyncio.ensure_future(runner.run(batch))
    loop = asyncio.get_running_loop()
    for link in links:
        assert await loop.run_in_executor(None, link.got_one.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the scheduler lets go of the thread once it has dropped the batch
    assert await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(thread, lambda: 1), 30) == 1
    assert [len(link.abandoned) for link in links] == [1, 1]
    assert batch.gen.gi_frame is None


def test_wake_loses_no_wake_up() -> None:
    wake = Wake()
    wake.set()
    assert wake.wait(30)  # set before the wait: returns at once
    wake.clear()
    threading.Timer(0.01, wake.set).start()
    assert wake.wait(30)  # set from another thread while parked
    wake.clear()
    read, write = os.pipe()
    os.set_blocking(read, False)
    threading.Timer(0.01, os.write, (write, b"x")).start()
    assert not wake.wait(30, [read])  # a watched descriptor ends the wait (and is drained)
    assert not wake.wait(0, [read])
    wake.close()
    os.close(read)
    os.close(write)
