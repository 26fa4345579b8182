"""Where the attention rank's poll thread parks: on a fast link end's doorbell only once an event-loop
sender (a future to settle) used it, and never while a compute thread sleeps on it; an end used only by
hot-path senders (whose compute thread takes its own answers) is swept and ticked but not parked on, so
a completion wakes one thread, not two."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.poller import PollThread
from asap.dataplane.ring import Backoff, Doorbell, Ring
from tests.dataplane.link_ends import attention_end


@pytest.fixture
def end() -> Iterator[AttentionLinkEnd]:
    loop = asyncio.new_event_loop()
    end = attention_end(loop)
    yield end
    end._poller.remove(end)
    end._unlink_names()
    end._unmap()
    loop.close()


def test_hot_path_senders_alone_keep_the_poll_thread_off_the_doorbell(end: AttentionLinkEnd) -> None:
    assert not end.park_here  # nothing sent yet
    wake = Wake()
    end.publish(0, 0, 1, 1, shape_only=True, link_s=0.0, ticket=Ticket(wake))
    assert not end.park_here  # a compute thread's dispatch: it takes its own answer
    end.publish(1, 0, 1, 1, shape_only=True, link_s=0.0)  # an event-loop sender: the poll thread settles it
    assert end.park_here
    end.parked_elsewhere = 1  # a compute thread sleeps on the end: one answer wakes one thread
    assert not end.park_here
    end.parked_elsewhere = 0
    assert end.park_here
    wake.close()


class _Endpoint:
    def __init__(self, park_here: bool) -> None:
        self.inbound = Ring(memoryview(bytearray(Ring.nbytes(2))), 0, 2)
        self.bell = Doorbell.__new__(Doorbell)  # never rung: only the list of parked bells matters
        self.park_here = park_here

    def poll(self, now_ns: int) -> bool:
        return False

    def tick(self, now_ns: int) -> None:
        pass


def test_poll_thread_parks_only_on_endpoints_that_ask_for_it() -> None:
    parked: list[list[Ring]] = []

    class Recording(Backoff):
        def idle(self, rings, bells):  # type: ignore[no-untyped-def]
            parked.append(list(rings))
            thread._stopped = True

    yes, no = _Endpoint(True), _Endpoint(False)
    thread = PollThread("test", backoff=Recording)
    thread._endpoints = (yes, no)  # type: ignore[assignment]
    thread._run()  # one sweep, one park, then stopped
    assert parked == [[yes.inbound]]
