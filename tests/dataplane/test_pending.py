"""Who waits for a dispatch on an attention end (``asap.dataplane.pending``)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.pending import PendingDispatch, fail_pending, settle_future
from asap.errors import Unavailable


async def test_failing_wakes_every_waiter_but_the_abandoned_and_the_answered() -> None:
    loop = asyncio.get_running_loop()
    waiting, answered = loop.create_future(), loop.create_future()
    answered.set_result(torch.zeros(1))
    ticket, abandoned = Ticket(Wake()), Ticket(Wake())
    entries = [
        PendingDispatch(1, 0, 1, waiting),
        PendingDispatch(2, 1, 1, answered),
        PendingDispatch(3, 2, 1, ticket),
        PendingDispatch(4, 3, 1, abandoned, abandoned=True),
    ]
    error = Unavailable("expert-0: fast link closed")
    assert fail_pending(entries, error) == 2
    with pytest.raises(Unavailable):
        await waiting
    assert ticket.done and not abandoned.done


async def test_an_outcome_goes_to_a_future_unless_it_gave_up() -> None:
    loop = asyncio.get_running_loop()
    result, failed, gave_up = loop.create_future(), loop.create_future(), loop.create_future()
    settle_future(result, torch.ones(2))
    settle_future(failed, Unavailable("expert-0: gone"))
    gave_up.cancel()
    settle_future(gave_up, torch.ones(2))  # no InvalidStateError
    assert torch.equal(await result, torch.ones(2))
    with pytest.raises(Unavailable):
        await failed
