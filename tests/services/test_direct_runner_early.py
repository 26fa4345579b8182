"""``DirectRunner`` with early results (``Ticket.settle_early``): the next layer's dispatches are posted
and the batch finished only once every verdict of the combined layer came; a failed verdict fails the
batch (its result was not one) and the scheduler goes on."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import Unavailable
from attention_svc.direct_runner import DirectBatch, DirectRunner
from tests.services.test_direct_runner import LAYERS, _advance, _gen


class EarlyLink:
    """Settles each dispatch early at once (rows + rank); its verdict comes when ``release`` is called
    (an error for ``fail_layer``). Records what was posted while a verdict was still missing."""

    def __init__(self, rank: int, *, fail_layer: int | None = None) -> None:
        self.rank = rank
        self.fail_layer = fail_layer
        self.unconfirmed: list[tuple[int, Ticket]] = []
        self.posted_early: list[tuple[int, int]] = []
        """Dispatches posted while an earlier layer of the same batch had no verdict yet."""
        self.posted: list[tuple[int, int]] = []
        self.abandoned: list[Ticket] = []
        self.lock = threading.Lock()

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        with self.lock:
            if any(t.verdict_pending for _, t in self.unconfirmed):
                self.posted_early.append(request.key)
            self.posted.append(request.key)
            ticket.plane_data = request.key
            request.sent()
            ticket.settle_early(ExchangeResult(request.dispatch.hidden + self.rank))
            self.unconfirmed.append((request.layer, ticket))
        threading.Timer(0.005, self.release).start()

    def release(self) -> None:
        with self.lock:
            for layer, ticket in self.unconfirmed:
                if ticket.verdict_pending:
                    ok = layer != self.fail_layer
                    ticket.settle(
                        ExchangeResult(torch.zeros(1)) if ok else Unavailable(f"rank {self.rank} broke")
                    )

    def abandon(self, ticket: Ticket) -> None:
        self.abandoned.append(ticket)


async def test_next_layer_waits_for_the_verdicts_and_results_are_the_early_ones(
    thread: ThreadPoolExecutor,
) -> None:
    runner = DirectRunner(thread, _advance)
    log: list[torch.Tensor] = []
    links = [EarlyLink(0), EarlyLink(1)]
    batch = DirectBatch(0, _gen(log), links, lambda logits: logits.clone())
    result = await asyncio.wait_for(runner.run(batch), 30)
    assert [float(h[0, 0]) for h in log] == [1.0, 3.0, 7.0]  # computed on the early results
    assert torch.equal(result, log[-1])
    for link in links:
        assert link.posted == [(0, layer) for layer in range(LAYERS)]
        assert link.posted_early == []  # never a layer posted before the last one's verdicts
        assert all(t.confirmed for _, t in link.unconfirmed)


async def test_a_failed_verdict_fails_the_batch_and_others_go_on(thread: ThreadPoolExecutor) -> None:
    runner = DirectRunner(thread, _advance)
    links: list[Any] = [EarlyLink(0), EarlyLink(1, fail_layer=1)]
    failed = DirectBatch(3, _gen([]), links, lambda logits: logits)
    with pytest.raises(Unavailable, match="rank 1 broke"):
        await asyncio.wait_for(runner.run(failed), 30)
    assert failed.gen.gi_frame is None  # the generator was closed
    assert (3, 2) not in links[0].posted  # the layer after the failed one was never posted
    fine = DirectBatch(4, _gen([]), [EarlyLink(0), EarlyLink(1)], lambda logits: logits.clone())
    assert float((await asyncio.wait_for(runner.run(fine), 30))[0, 0]) == 7.0
