"""Early results on the hot path (``Ticket.settle_early``, ``ASAP_GPU_HOST_FREE``): a ticket settled
before the peer's completion keeps waiting for its verdict, which the next ``settle`` (an answer or a
failure) gives exactly once, and a broken link's ``fail_pending`` delivers a failed verdict too."""

from __future__ import annotations

import threading

import torch

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.pending import PendingDispatch, fail_pending
from asap.dataplane.plane import ExchangeResult
from asap.errors import InvalidArgument, Unavailable


def test_an_early_result_waits_for_its_verdict_and_takes_the_first() -> None:
    seen: list[Ticket] = []
    ticket = Ticket(Wake())
    ticket.observe = seen.append
    early = ExchangeResult(torch.ones(2, 4))
    ticket.settle_early(early)
    assert ticket.done and ticket.provisional and ticket.verdict_pending
    assert ticket.outcome is early and not seen  # the round trip is not over for the metrics yet
    ticket.wake.clear()
    ticket.settle(ExchangeResult(torch.ones(2, 4)))  # the completion: a good verdict
    assert ticket.confirmed and ticket.failure is None and not ticket.verdict_pending
    assert ticket.outcome is early and ticket.wake.is_set and seen == [ticket]
    ticket.settle(Unavailable("late"))  # a second verdict is ignored
    assert ticket.failure is None and seen == [ticket]


def test_a_failed_verdict_is_kept_and_a_late_early_settle_does_nothing() -> None:
    ticket = Ticket(Wake())
    ticket.settle_early(ExchangeResult(torch.zeros(1, 1)))
    ticket.settle(InvalidArgument("layer 9 is not an MoE layer"))
    assert ticket.confirmed and isinstance(ticket.failure, InvalidArgument)
    answered = Ticket(Wake())
    answered.settle(ExchangeResult(torch.zeros(1, 1)))  # the completion came first
    answered.settle_early(ExchangeResult(torch.ones(1, 1)))
    assert not answered.provisional and not answered.verdict_pending
    assert float(answered.outcome.hidden[0, 0]) == 0.0  # type: ignore[union-attr]


def test_a_broken_link_fails_the_verdicts_still_to_come() -> None:
    early, answered, waiting = Ticket(Wake()), Ticket(Wake()), Ticket(Wake())
    early.settle_early(ExchangeResult(torch.zeros(1, 1)))
    answered.settle_early(ExchangeResult(torch.zeros(1, 1)))
    answered.settle(ExchangeResult(torch.zeros(1, 1)))
    entries = [PendingDispatch(1, 0, 1, early), PendingDispatch(2, 1, 1, waiting)]
    assert fail_pending(entries, Unavailable("expert-0: stopped answering")) == 2
    assert isinstance(early.failure, Unavailable) and isinstance(waiting.outcome, Unavailable)
    assert answered.failure is None


def test_early_settle_and_verdict_from_two_threads_lose_nothing() -> None:
    """The plane serialises the two under one lock (``gpu_fast._settle_early``); either order ends in a
    settled ticket with no verdict pending."""
    for _ in range(200):
        ticket, lock = Ticket(Wake()), threading.Lock()

        def early(t: Ticket = ticket, lk: threading.Lock = lock) -> None:
            with lk:
                t.settle_early(ExchangeResult(torch.zeros(1)))

        def verdict(t: Ticket = ticket, lk: threading.Lock = lock) -> None:
            with lk:
                t.settle(ExchangeResult(torch.zeros(1)))

        threads = [threading.Thread(target=early), threading.Thread(target=verdict)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert ticket.done and not ticket.verdict_pending
