"""How ``DirectRunner`` parks its compute thread: on futex words (``DirectLink.park_futex``) when every
link it waits on offers them and its ``Wake`` has a word, else on the doorbells (``park``); in both ways
an answer that lands while it sleeps wakes it and the batch completes with the right results."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from asap.dataplane import futex
from asap.dataplane.direct import Ticket
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.dataplane.spin import SpinBudget
from attention_svc.direct_runner import DirectBatch, DirectRunner
from tests.services.test_direct_runner import LAYERS, _advance, _gen


class WordLink:
    """Answers each dispatch from another thread into a 'ring' it polls; the answerer wakes a futex word
    (as the expert's ``Ring.wake`` does) and a pipe (as its doorbell does)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.word = futex.Word()
        self.landed: list[tuple[Ticket, Any]] = []
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        ticket.plane_data = request.key
        request.sent()
        outcome = ExchangeResult(request.dispatch.hidden + self.rank)
        threading.Timer(0.005, self._answer, (ticket, outcome)).start()

    def _answer(self, ticket: Ticket, outcome: Any) -> None:
        with self.lock:
            self.landed.append((ticket, outcome))
        self.word.value = 0
        futex.wake(self.word.address, futex.WAKE_ALL)
        os.write(self.write, b"\0")

    def abandon(self, ticket: Ticket) -> None:
        pass

    def poll(self) -> None:
        with self.lock:
            landed, self.landed = self.landed, []
        for ticket, outcome in landed:
            ticket.settle(outcome)

    def park(self, on: bool) -> list[int]:
        self.calls.append("park")
        return [self.read] if on else []

    def park_futex(self, on: bool) -> tuple[int, int] | None:
        self.calls.append("park_futex")
        if on:
            self.word.value = 1
            return self.word.address, 1
        return None


@pytest.mark.parametrize("words", [True, False], ids=["futex-words", "doorbells"])
async def test_the_compute_thread_parks_on_words_when_it_can_and_is_woken(
    thread: ThreadPoolExecutor, words: bool
) -> None:
    if words and not futex.available():
        pytest.skip("no shared futexes here")
    runner = DirectRunner(thread, _advance)
    if not words:
        runner._wake._word = None  # a process without futexes (``ASAP_FAST_FUTEX=0``)
    links = [WordLink(0), WordLink(1)]
    log: list[torch.Tensor] = []
    batch = DirectBatch(0, _gen(log), links, lambda logits: logits.clone())
    result = await asyncio.wait_for(runner.run(batch), 30)
    assert [float(h[0, 0]) for h in log] == [1.0, 3.0, 7.0][:LAYERS]
    assert torch.equal(result, log[-1])
    for link in links:
        assert link.calls, "the compute thread never parked"
        assert set(link.calls) == ({"park_futex"} if words else {"park"})


class SpinLink(WordLink):
    """A ``WordLink`` whose waiter may spin before parking (``spin_wait``, as the CPU fast plane's)."""

    spin_wait = True


@pytest.mark.parametrize("spins", [True, False], ids=["spin-link", "no-spin-link"])
async def test_the_compute_thread_spins_before_parking_on_links_that_allow_it(
    thread: ThreadPoolExecutor, spins: bool
) -> None:
    runner = DirectRunner(thread, _advance)
    runner.spin = SpinBudget(5.0, cores=4)  # a long cap, so the answers (5 ms away) land in the spin
    for _ in range(4):
        runner.spin.observe(2.0)
    links = [SpinLink(r) if spins else WordLink(r) for r in range(2)]
    log: list[torch.Tensor] = []
    batch = DirectBatch(0, _gen(log), links, lambda logits: logits.clone())
    result = await asyncio.wait_for(runner.run(batch), 30)
    assert [float(h[0, 0]) for h in log] == [1.0, 3.0, 7.0][:LAYERS]
    assert torch.equal(result, log[-1])
    if spins:  # every answer seen spinning, no park
        assert runner.spin.hits >= LAYERS and all(link.calls == [] for link in links)
    else:  # parked as before
        assert runner.spin.spins == 0 and all(link.calls for link in links)
