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


class _ArmingDirect(SlotDirect[Any, _End]):
    """Fills and publishes in two calls (``armable``), recording them; may fail either."""

    armable = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[str, int]] = []
        self.fail: str | None = None

    def _fill(self, slot: int, request: PlaneRequest) -> None:
        self.calls.append(("fill", slot))
        if self.fail == "fill":
            raise InternalError("expert-0: filling a slot failed")

    def _publish(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        self.calls.append(("publish", slot))
        if self.fail == "publish":
            raise InternalError("expert-0: the link broke")
        return 9


async def test_an_armed_slot_is_filled_at_once_and_sent_or_given_back_once() -> None:
    _, end, _ = await _link()
    plain, _, _ = await _link()
    assert plain.arm(_request(2), Ticket(Wake())) is None  # not armable: the caller posts
    direct = _ArmingDirect(plain.plane, end, plain.loop)
    assert direct.arm(_request(5), Ticket(Wake())) is None  # larger than a slot: the inner plane's
    ticket = Ticket(Wake())
    armed = direct.arm(_request(2), ticket)
    assert armed is not None and direct.calls == [("fill", 0)] and end._free == [1]
    assert ticket.plane_data is None  # nothing sent yet
    armed.publish()
    armed.publish()
    armed.release()  # both no-ops once published
    assert direct.calls == [("fill", 0), ("publish", 0)] and ticket.plane_data == 9 and end._free == [1]
    unsent = direct.arm(_request(2), Ticket(Wake()))
    assert unsent is not None and end._free == []
    unsent.release()
    unsent.release()
    assert end._free == [1]  # given back once, unsent
    direct.fail = "fill"
    with pytest.raises(InternalError, match="filling"):
        direct.arm(_request(2), Ticket(Wake()))
    assert end._free == [1]  # a failed fill gives its slot back
    direct.fail = "publish"
    failing = direct.arm(_request(2), Ticket(Wake()))
    assert failing is not None and end._free == []
    with pytest.raises(InternalError, match="broke"):
        failing.publish()
    failing.release()  # a no-op: the failed publish gave the slot back
    assert end._free == [1]


def test_only_the_cpu_fast_link_arms() -> None:
    """The GPU fast link fills its slots on a stream (``_send``) and inherits the CPU link's class: it
    must not take the CPU link's two-step host fill (through it, a GPU dispatch's fill hung)."""
    from asap.dataplane.fast import _Direct
    from asap.dataplane.gpu_fast import _GpuDirect
    from asap.dataplane.nixl_direct import NixlDirect

    assert _Direct.armable
    assert not _GpuDirect.armable and not NixlDirect.armable
