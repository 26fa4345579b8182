"""An attention link end whose event loop waits on the completion doorbell itself (``loop_bell``, what
GPU ends do with the hot path off): the first event-loop dispatch sets the completion ring's waiting
flag for good and registers the loop's reader, so the expert's wake rings the doorbell; the reader takes
the completion on the loop thread and settles the future there (no hand-off through
``call_soon_threadsafe``); the poll thread never parks on the end; closing removes the reader."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch

from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.fastlink import Completion
from asap.errors import Unavailable
from tests.dataplane.link_ends import attention_end


@pytest_asyncio.fixture
async def end() -> AsyncIterator[AttentionLinkEnd]:
    end = attention_end(asyncio.get_running_loop(), dtype=torch.float32)
    end.loop_bell = True
    yield end
    end.close()


def _complete(end: AttentionLinkEnd, slot: int, seq: int, rows: int) -> None:
    """What the expert rank does after computing a slot: push the completion, wake the consumer."""
    assert end.completions.try_push(Completion(0, 1, slot, 0, rows, seq, 0, 0, 0).pack())
    end.completions.wake(end.completion_bell)


async def test_the_loop_takes_its_completions_from_the_doorbell(end: AttentionLinkEnd) -> None:
    loop = asyncio.get_running_loop()
    settled_on: list[int] = []
    settle = end._settle

    def recording(pending, outcome):  # type: ignore[no-untyped-def]
        settled_on.append(threading.get_ident())
        settle(pending, outcome)

    end._settle = recording  # type: ignore[method-assign]
    assert not end.park_here and end.completions.ready() is False
    fd = end.completion_bell.fileno()
    seq, future = end.publish(0, 0, 1, 3, shape_only=True, link_s=0.0)
    assert future is not None
    assert not end.park_here  # the poll thread keeps off: the flag is the loop's
    assert fd in {key.fd for key in loop._selector.get_map().values()}  # type: ignore[attr-defined]
    # the expert answers from another thread: its wake rings the doorbell, the loop's reader takes it
    threading.Thread(target=_complete, args=(end, 0, seq, 3)).start()
    result = await asyncio.wait_for(future, 5)
    assert tuple(result.shape) == (3, end.geometry.hidden_size)
    assert settled_on == [threading.get_ident()]  # settled in the reader, on the loop thread
    # the flag stays set: a second dispatch's completion rings too
    seq2, future2 = end.publish(1, 0, 2, 2, shape_only=True, link_s=0.0)
    assert future2 is not None
    threading.Thread(target=_complete, args=(end, 1, seq2, 2)).start()
    assert tuple((await asyncio.wait_for(future2, 5)).shape) == (2, end.geometry.hidden_size)
    assert len(settled_on) == 2


async def test_a_completion_taken_by_the_poll_thread_still_settles_on_the_loop(end: AttentionLinkEnd) -> None:
    seq, future = end.publish(0, 0, 1, 1, shape_only=True, link_s=0.0)
    assert future is not None
    assert end.completions.try_push(Completion(0, 1, 0, 0, 1, seq, 0, 0, 0).pack())
    # the poll thread's sweep gets there first (no wake sent): it hands the settle to the loop
    poll = threading.Thread(target=end.poll, args=(0,))
    poll.start()
    poll.join()
    assert tuple((await asyncio.wait_for(future, 5)).shape) == (1, end.geometry.hidden_size)


async def test_closing_removes_the_reader_and_fails_what_waits(end: AttentionLinkEnd) -> None:
    loop = asyncio.get_running_loop()
    fd = end.completion_bell.fileno()
    _, future = end.publish(0, 0, 1, 1, shape_only=True, link_s=0.0)
    assert future is not None
    end.fail(Unavailable("expert: gone"))
    with pytest.raises(Unavailable, match="expert: gone"):
        await asyncio.wait_for(future, 5)
    assert fd not in {key.fd for key in loop._selector.get_map().values()}  # type: ignore[attr-defined]


async def test_without_loop_bell_the_loop_registers_nothing(end: AttentionLinkEnd) -> None:
    end.loop_bell = False
    loop = asyncio.get_running_loop()
    before = set(loop._selector.get_map())  # type: ignore[attr-defined]
    end.publish(0, 0, 1, 1, shape_only=True, link_s=0.0)
    assert set(loop._selector.get_map()) == before  # type: ignore[attr-defined]
    assert end.park_here  # the poll thread parks on it and settles through the loop
