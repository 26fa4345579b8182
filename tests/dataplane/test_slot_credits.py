"""The slots of an attention end as credits (``asap.dataplane.slot_credits``), shared by the fast and
the NIXL ends."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.slot_credits import SlotCredits
from asap.errors import Unavailable


def _credits(slots: int = 1) -> SlotCredits:
    return SlotCredits(slots, peer="expert-0", loop=asyncio.get_running_loop())


def test_a_blocked_sender_takes_the_slot_given_back_on_another_thread() -> None:
    loop = asyncio.new_event_loop()
    try:
        credits = SlotCredits(1, peer="expert-0", loop=loop)
        held = credits.take_slot_blocking(Ticket(Wake()))
        taken: list[int] = []
        sender = threading.Thread(target=lambda: taken.append(credits.take_slot_blocking(Ticket(Wake()))))
        sender.start()
        while not credits.held_back:  # until it found no free slot and waits
            time.sleep(0.001)
        credits.give_back(held)
        sender.join(5)
        assert taken == [held] and credits.held_back == 1 and credits._free == []
    finally:
        loop.close()


async def test_a_blocked_sender_gives_up_when_its_ticket_is_cancelled() -> None:
    credits = _credits()
    await credits.take_slot()
    ticket = Ticket(Wake())
    ticket.cancelled = True
    with pytest.raises(Unavailable, match="cancelled while waiting"):
        credits.take_slot_blocking(ticket, poll_s=0.001)


async def test_a_slot_handed_to_a_waiting_coroutine_is_not_free_for_a_thread() -> None:
    credits = _credits()
    held = await credits.take_slot()
    waiting = asyncio.ensure_future(credits.take_slot())
    await asyncio.sleep(0)
    credits.give_back(held)
    assert await asyncio.wait_for(waiting, timeout=5) == held
    ticket = Ticket(Wake())
    ticket.cancelled = True  # no slot is free: a thread would wait, so it gives up at once
    with pytest.raises(Unavailable):
        credits.take_slot_blocking(ticket, poll_s=0.001)


async def test_breaking_fails_the_waiting_coroutines() -> None:
    credits = _credits()
    await credits.take_slot()
    waiting = asyncio.ensure_future(credits.take_slot())
    await asyncio.sleep(0)
    error = Unavailable("expert-0: fast link closed")
    credits.broken = error
    credits._fail_waiters(error)
    with pytest.raises(Unavailable, match="closed"):
        await waiting
    assert not credits._waiters
