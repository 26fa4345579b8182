"""The hot-path link shared by the slot planes (``asap.dataplane.slot_direct``), with a fake plane."""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.dataplane.slot_credits import SlotCredits
from asap.dataplane.slot_direct import SlotDirect
from asap.errors import InternalError
from asap.model.placement import RankDispatch


class _End(SlotCredits):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(2, peer="expert-0", loop=loop)
        self.abandoned: list[int] = []

    def abandon(self, seq: int) -> None:
        self.abandoned.append(seq)


class _Direct(SlotDirect[Any, _End]):
    fail = False

    def _send(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        if self.fail:
            raise InternalError("expert-0: filling a slot failed")
        return 7


def _request(rows: int) -> PlaneRequest:
    dispatch = RankDispatch(
        0, torch.arange(rows), torch.zeros(rows, 4), torch.zeros(rows, 2), torch.ones(rows, 2)
    )
    return PlaneRequest(1, 0, dispatch)


async def _link() -> tuple[_Direct, _End, list[PlaneRequest]]:
    inner_calls: list[PlaneRequest] = []

    async def exchange(request: PlaneRequest) -> ExchangeResult:
        inner_calls.append(request)
        return ExchangeResult(torch.ones(request.rows, 4))

    loop = asyncio.get_running_loop()
    end = _End(loop)
    plane = SimpleNamespace(max_rows=4, inner=SimpleNamespace(exchange=exchange))
    return _Direct(plane, end, loop), end, inner_calls


async def test_a_failed_send_gives_its_slot_back_and_a_sent_one_keeps_it() -> None:
    direct, end, _ = await _link()
    ticket = Ticket(Wake())
    direct.post(_request(2), ticket)
    assert ticket.plane_data == 7 and end._free == [1]
    direct.fail = True
    with pytest.raises(InternalError):
        direct.post(_request(2), Ticket(Wake()))
    assert end._free == [1]  # taken and given back
    direct.abandon(ticket)
    assert end.abandoned == [7]


async def test_a_dispatch_larger_than_a_slot_goes_through_the_inner_plane() -> None:
    direct, end, inner_calls = await _link()
    ticket = Ticket(Wake())
    await asyncio.to_thread(direct.post, _request(5), ticket)
    posted = ticket.plane_data
    assert isinstance(posted, concurrent.futures.Future)
    await asyncio.wait_for(asyncio.wrap_future(posted), 5)  # its callbacks ran in order: settled first
    assert ticket.done
    assert len(inner_calls) == 1 and sorted(end._free) == [0, 1]
