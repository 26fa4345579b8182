"""The attention rank's metering of a plane's hot-path link: round trips and failures land on the
ExpertLink, and the wrapper offers exactly the optional calls (poll, park) of the link it wraps."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from asap.dataplane.direct import DirectLink, Ticket, Wake
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import Unavailable
from attention_svc.expert_link import ExpertLink, _metered


class PostingLink:
    """Settles every post at once with ``outcome``."""

    def __init__(self, outcome: ExchangeResult | Unavailable) -> None:
        self.outcome = outcome
        self.calls: list[str] = []

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        self.calls.append("post")
        ticket.settle(self.outcome)

    def abandon(self, ticket: Ticket) -> None:
        self.calls.append("abandon")


class PollingLink(PostingLink):
    def poll(self) -> None:
        self.calls.append("poll")


class ParkingLink(PollingLink):
    def park(self, on: bool) -> Sequence[int]:
        self.calls.append(f"park {on}")
        return (7,)


@pytest.fixture
async def owner() -> AsyncIterator[ExpertLink]:
    with ThreadPoolExecutor(1) as codec:
        # Never dialled: only its meters are used.
        link = ExpertLink(
            "127.0.0.1:1", 0, attention_rank=0, hidden_size=4, dtype=torch.float32,
            max_chunk_bytes=1 << 20, codec=codec,
        )  # fmt: skip
        try:
            yield link
        finally:
            await link.close()


def _post(link: DirectLink) -> Ticket:
    wake = Wake()
    ticket = Ticket(wake)
    link.post(None, ticket)  # type: ignore[arg-type]  # the fakes never read the request
    wake.close()
    return ticket


async def test_a_settled_post_is_a_round_trip_and_an_error_a_failure(owner: ExpertLink) -> None:
    ok = _metered(PostingLink(ExchangeResult(torch.zeros(1, 4))), owner)
    _post(ok)
    _post(ok)
    assert (owner.round_trip_s.snapshot().count, owner.failures) == (2, 0)
    _post(_metered(PostingLink(Unavailable("gone")), owner))
    assert (owner.round_trip_s.snapshot().count, owner.failures) == (2, 1)


@pytest.mark.parametrize(
    ("inner", "calls"),
    [(PostingLink, set()), (PollingLink, {"poll"}), (ParkingLink, {"poll", "park"})],
    ids=["plain", "polling", "parking"],
)
async def test_the_wrapper_offers_the_optional_calls_of_its_link_and_no_others(
    owner: ExpertLink, inner: type[PostingLink], calls: set[str]
) -> None:
    link = inner(ExchangeResult(torch.zeros(1, 4)))
    metered = _metered(link, owner)
    assert {name for name in ("poll", "park") if hasattr(metered, name)} == calls
    ticket = _post(metered)
    metered.abandon(ticket)
    if "poll" in calls:
        metered.poll()  # type: ignore[attr-defined]
    if "park" in calls:
        assert metered.park(True) == (7,)  # type: ignore[attr-defined]
        metered.park(False)  # type: ignore[attr-defined]
    expected = ["post", "abandon", *(["poll"] if "poll" in calls else [])]
    expected += ["park True", "park False"] if "park" in calls else []
    assert link.calls == expected
