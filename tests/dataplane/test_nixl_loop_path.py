"""The NIXL event-loop path's hand-off (``asap.dataplane.nixl_attention``): the answers one look of the
poll thread takes reach the loop with one wake-up. Needs NIXL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from asap.dataplane.fastlink import Request
from asap.dataplane.nixl_attention import NixlAttentionEnd, write_dispatch
from asap.dataplane.nixl_link import nixl_missing
from asap.dataplane.plane import PlaneRequest
from asap.model.placement import RankDispatch
from tests.dataplane.test_nixl_link import _answer, _pair

pytestmark = pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL")


def _request(rows: int) -> PlaneRequest:
    return PlaneRequest(1, 0, RankDispatch(0, torch.arange(rows), torch.randn(rows, 16),
                                           torch.zeros(rows, 2, dtype=torch.int32), torch.ones(rows, 2)))  # fmt: skip


def _all_notes(end: Any, sender: Any, count: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < count and time.monotonic() < deadline:
        sender.reap()
        got += end.notifications()
    assert len(got) == count
    return got


async def test_the_answers_of_one_look_reach_the_loop_with_one_wake_up() -> None:
    a, b = _pair()
    loop = asyncio.get_running_loop()
    end = NixlAttentionEnd(a, peer="tb", dtype=torch.float32, rank=0, loop=loop, peer_timeout_s=60)
    wake_ups: list[object] = []
    real = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        wake_ups.append(callback)
        return real(callback, *args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        futures, expected = [], {}
        for rows in (3, 4):  # two coroutines' dispatches, one per slot
            request = _request(rows)
            slot = await end.take_slot()
            header = end.header(request)
            future = end.expect(slot, header)
            d = request.dispatch
            write_dispatch(a, slot, torch.float32, header, d.hidden, d.expert_ids, d.weights,
                           end.descriptor(slot, request, header.seq))  # fmt: skip
            futures.append(future)
        for note in _all_notes(b, a, 2):
            results = torch.randn(Request.unpack(note[1:]).rows, 16)
            expected[Request.unpack(note[1:]).seq] = results
            _answer(b, note, results)
        answers = _all_notes(a, b, 2)  # both completions arrived: one look of the poll thread takes them
        a.notifications = lambda: answers  # type: ignore[method-assign]
        assert end.poll(time.monotonic_ns())
        assert len(wake_ups) == 1  # one hand-off to the loop for both
        got = await asyncio.wait_for(asyncio.gather(*futures), 30)
        for seq, result in zip(sorted(expected), got, strict=True):
            assert torch.equal(result, expected[seq])
    finally:
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        end.close()
        b.close()
