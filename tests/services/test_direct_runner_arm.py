"""``DirectRunner`` with links that arm (``DirectLink.arm``): every dispatch of a layer is filled while the
layer's work still runs (``MoERequest.rest``) and sent only once it is over; a link without ``arm`` is
posted after it; slots filled but not sent go back when the layer cannot be sent."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import Unavailable
from asap.model.attention_part import MoERequest
from attention_svc.direct_runner import DirectBatch, DirectRunner
from tests.services.test_direct_runner import LAYERS, _advance

Log = list[tuple[str, int, int]]  # (event, layer, rank)


class _Armed:
    def __init__(self, link: ArmingLink, request: PlaneRequest, ticket: Ticket) -> None:
        self.link, self.request, self.ticket = link, request, ticket

    def publish(self) -> None:
        self.link.log.append(("publish", self.request.layer, self.link.rank))
        if self.request.layer == self.link.fail_publish_layer:
            raise Unavailable(f"rank {self.link.rank} broke")
        self.link.post(self.request, self.ticket, logged=False)

    def release(self) -> None:
        self.link.log.append(("release", self.request.layer, self.link.rank))


class ArmingLink:
    """Answers each dispatch with its rows + rank; arms when ``arms``; may fail a layer's publish."""

    def __init__(
        self, rank: int, log: Log, *, arms: bool = True, fail_publish_layer: int | None = None
    ) -> None:
        self.rank, self.log = rank, log
        self.fail_publish_layer = fail_publish_layer
        if not arms:
            self.arm = lambda request, ticket: None  # type: ignore[method-assign]

    def arm(self, request: PlaneRequest, ticket: Ticket) -> _Armed | None:
        self.log.append(("arm", request.layer, self.rank))
        return _Armed(self, request, ticket)

    def post(self, request: PlaneRequest, ticket: Ticket, logged: bool = True) -> None:
        if logged:
            self.log.append(("post", request.layer, self.rank))
        ticket.plane_data = request.key
        request.sent()
        outcome = ExchangeResult(request.dispatch.hidden + self.rank)
        threading.Timer(0.001, ticket.settle, (outcome,)).start()

    def abandon(self, ticket: Ticket) -> None:
        pass


def _gen(log: Log) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
    hidden = torch.zeros(2, 4)
    for layer in range(LAYERS):
        request = MoERequest(
            layer,
            hidden,
            torch.zeros(2, 1, dtype=torch.int64),
            torch.ones(2, 1),
            rest=lambda layer=layer: log.append(("finish", layer, -1)),  # type: ignore[misc]
        )
        hidden = yield request
        request.finish()
    return hidden


async def test_slots_are_filled_inside_the_layer_and_sent_after_it(thread: ThreadPoolExecutor) -> None:
    log: Log = []
    runner = DirectRunner(thread, _advance)
    links: list[Any] = [ArmingLink(0, log), ArmingLink(1, log, arms=False)]
    batch = DirectBatch(0, _gen(log), links, lambda logits: logits.clone())
    result = await asyncio.wait_for(runner.run(batch), 30)
    assert float(result[0, 0]) == 7.0  # 0 -> 1 -> 3 -> 7, as without arming
    expected: Log = []
    for layer in range(LAYERS):  # rank 0 armed before the finish; rank 1 (no arm) posted after it
        expected += [("arm", layer, 0), ("finish", layer, -1), ("publish", layer, 0), ("post", layer, 1)]
    assert log == expected


async def test_a_failed_publish_fails_the_batch_and_gives_back_the_unsent_slots(
    thread: ThreadPoolExecutor,
) -> None:
    log: Log = []
    runner = DirectRunner(thread, _advance)
    links: list[Any] = [ArmingLink(0, log, fail_publish_layer=1), ArmingLink(1, log)]
    batch = DirectBatch(1, _gen(log), links, lambda logits: logits)
    with pytest.raises(Unavailable, match="rank 0 broke"):
        await asyncio.wait_for(runner.run(batch), 30)
    layer1 = [event for event in log if event[1] == 1]
    assert layer1 == [
        ("arm", 1, 0),
        ("arm", 1, 1),
        ("finish", 1, -1),
        ("publish", 1, 0),  # fails
        ("release", 1, 0),  # (a no-op for a plane's slot, which its failed publish gave back)
        ("release", 1, 1),  # rank 1's slot was filled and never sent
    ]
    assert not [event for event in log if event[1] == 2]  # the batch ended at layer 1
    assert batch.gen.gi_frame is None


async def test_traced_layers_end_when_their_work_does(
    thread: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracing, a layer's ``attention.layer`` span runs to the end of its ``rest`` (attention
    compute, not the dispatch's time: ``asap trace summarize`` tells them apart by it)."""
    from opentelemetry.context import Context

    from asap.telemetry import spans
    from attention_svc import direct_runner

    recorded: list[tuple[str, int, int, dict[str, Any]]] = []
    monkeypatch.setattr(
        direct_runner.spans,
        "record",
        lambda name, _ctx, start, end, attrs: recorded.append((name, start, end, attrs)),
    )
    ends: dict[int, int] = {}

    def gen() -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        hidden = torch.zeros(2, 4)
        for layer in range(LAYERS):

            def rest(layer: int = layer) -> None:
                time.sleep(0.01)
                ends[layer] = time.time_ns()

            request = MoERequest(
                layer, hidden, torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), rest=rest
            )
            hidden = yield request
        return hidden

    log: Log = []
    runner = DirectRunner(thread, _advance)
    batch = DirectBatch(2, gen(), [ArmingLink(0, log), ArmingLink(1, log)], lambda x: x, Context())
    await asyncio.wait_for(runner.run(batch), 30)
    layers = {
        attrs[spans.LAYER]: (start, end)
        for name, start, end, attrs in recorded
        if name == spans.ATTENTION_LAYER
    }
    assert sorted(layers) == list(range(LAYERS))
    for layer, (start, end) in layers.items():
        assert end >= ends[layer] and end - start >= 10_000_000  # the rest's 10 ms inside the span
