"""The attention side's poll thread parks on doorbells with timeouts from ``DOORBELL_FIRST_SLEEP_S``;
a result it holds for its modelled transfer (emulated compute, the event-loop path) gets no doorbell,
so the link end reports work while one is held and the thread keeps sweeping until it is delivered."""

from __future__ import annotations

import asyncio
import time

import torch

from asap.dataplane.fastlink import FLAG_SHAPE_ONLY, Completion, LinkGeometry, Request
from asap.dataplane.poller import DOORBELL_FIRST_SLEEP_S, doorbell_backoff
from asap.dataplane.ring import Ring
from tests.dataplane.link_ends import attention_end


def test_doorbell_backoff_parks_without_spinning() -> None:
    backoff = doorbell_backoff()
    assert backoff.spin_s == 0 and backoff.first_sleep_s == DOORBELL_FIRST_SLEEP_S
    assert backoff.first_sleep_s <= backoff.park_s


async def test_a_held_result_keeps_the_sweeps_going_until_it_is_delivered() -> None:
    geometry = LinkGeometry(slots=2, slot_bytes=64 * 1024, hidden_size=8, top_k=2, itemsize=2)
    end = attention_end(
        asyncio.get_running_loop(),
        geometry,
        peer="expert rank 0 at test",
        result_link_s=20e-3 / (4 * 8 * 2),  # 20 ms for the 4 rows' results
    )
    try:
        slot = await end.take_slot()
        end.fill(slot, end.header(0, 1, 4, "", "", slot), None, torch.zeros(4, 2), torch.ones(4, 2))
        seq, future = end.publish(slot, 0, 1, 4, shape_only=True, link_s=0.0)
        assert future is not None
        raw = Ring(end._buf, geometry.requests_at, geometry.slots).pop()  # what the expert would take
        assert raw is not None and Request.unpack(raw).flags == FLAG_SHAPE_ONLY
        expert_side = Ring(end._buf, geometry.completions_at, geometry.slots)
        assert expert_side.try_push(Completion(0, 1, slot, 0, 4, seq, 0, 0, 0).pack())
        assert end.poll(time.monotonic_ns())  # taken and held for its transfer
        assert end.held() == 1 and not future.done()
        assert end.poll(time.monotonic_ns())  # still held: no doorbell will come, so sweep again
        while end.held():
            end.poll(time.monotonic_ns() + 10**9)  # past its due time: delivered
        result = await asyncio.wait_for(future, 5)
        assert result.shape == (4, 8) and result.device.type == "meta"
        assert not end.poll(time.monotonic_ns())  # nothing left: the thread may park
    finally:
        end.close()
