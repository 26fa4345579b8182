"""The slots of a NIXL attention end as credits (``asap.dataplane.nixl_credits``), without NIXL."""

from __future__ import annotations

import asyncio

import pytest

from asap.dataplane.nixl_credits import NixlSlotCredits
from asap.errors import Unavailable


def _credits(slots: int = 2) -> NixlSlotCredits:
    return NixlSlotCredits(slots, peer="expert-0", loop=asyncio.get_running_loop(), lease_cap=1)


async def test_slots_are_taken_lowest_first_and_come_back() -> None:
    credits = _credits()
    first, second = await credits.take_slot(), await credits.take_slot()
    assert (first, second) == (0, 1)
    credits.give_back(first)
    assert await credits.take_slot() == 0


async def test_a_waiter_is_handed_the_next_slot_given_back() -> None:
    credits = _credits(1)
    held = await credits.take_slot()
    waiting = asyncio.ensure_future(credits.take_slot())
    await asyncio.sleep(0)
    assert not waiting.done()
    credits.give_back(held)
    assert await asyncio.wait_for(waiting, timeout=5) == held
    assert credits._free == []  # handed on, not put back


async def test_a_broken_end_refuses_credits_and_keeps_its_slots() -> None:
    credits = _credits()
    slot = await credits.take_slot()
    credits.broken = Unavailable("expert-0: NIXL link closed")
    with pytest.raises(Unavailable, match="closed"):
        await credits.take_slot()
    credits.give_back(slot)  # its peer may still write it: never reused
    assert slot not in credits._free


async def test_a_freed_lease_gives_its_slot_back() -> None:
    credits = _credits()
    slot = await credits.take_slot()
    credits._leased = 1
    credits._unlease(slot)
    assert credits._leased == 0 and slot in credits._free
