"""Values the scheduler core takes and returns: requests, the queue of pending ones, per-request results
and cluster snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asap import clock
from asap.errors import AsapError


@dataclass(slots=True, eq=False)
class ScheduledRequest:
    """One prefill request as the scheduler core sees it (already validated and tokenised).

    Compared and hashed by identity: two requests with the same id are still two requests.
    """

    request_id: str
    token_ids: list[int]
    temperature: float = 0.0
    """0 = greedy."""
    seed: int | None = None
    top_logprobs: int = 0
    """How many (token id, logprob) pairs to return."""
    ttft_slo_ms: float | None = None
    """The client's TTFT target, if any (informational for now; later policies order by it)."""
    deadline: float | None = None
    """Absolute deadline in event-loop time (``loop.time()``); ``None`` = none."""
    arrival: float = field(default_factory=clock.monotonic)
    """``asap.clock.monotonic()`` (``time.monotonic()``) at arrival; queue and TTFT times are measured from it."""
    traceparent: str = ""
    tracestate: str = ""
    queue_span: Any = field(default=None, repr=False)
    """Tracing: the open ``scheduler.queue`` span, ended by :meth:`end_queue_span` (``None`` when off)."""
    _future: asyncio.Future[RequestResult] | None = field(default=None, init=False, repr=False)
    """Set by ``SchedulerCore.submit``; resolved with the result or the request's error."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def waiting(self) -> bool:
        """Submitted and its caller still waits for the outcome."""
        return self._future is not None and not self._future.done()

    def end_queue_span(self) -> None:
        """Its (first) batch went to an attention rank, or it left: its queueing is over. Idempotent."""
        span, self.queue_span = self.queue_span, None
        if span is not None:
            span.end()

    def settle(self, outcome: RequestResult | AsapError) -> None:
        """Resolve the caller's wait, unless it already gave up (then the outcome is dropped)."""
        if self._future is None or self._future.done():
            return
        if isinstance(outcome, AsapError):
            self._future.set_exception(outcome)
        else:
            self._future.set_result(outcome)


class RequestQueue:
    """The requests waiting to be placed, in arrival order (FIFO); each at most once."""

    def __init__(self) -> None:
        self._requests: dict[ScheduledRequest, None] = {}  # an insertion-ordered set

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[ScheduledRequest]:
        return iter(self._requests)

    def push(self, request: ScheduledRequest) -> None:
        self._requests[request] = None

    def live(self, now: float) -> list[ScheduledRequest]:
        """The queue without the requests whose deadline (loop time) passed: their own ``submit``
        withdraws and fails them."""
        return [r for r in self._requests if r.deadline is None or r.deadline > now]

    def remove(self, requests: Iterable[ScheduledRequest]) -> None:
        """Take ``requests`` off the queue (placed, or withdrawn); those not queued are ignored."""
        for request in requests:
            self._requests.pop(request, None)

    def fail_all(self, error: AsapError) -> None:
        """Fail every queued request with ``error`` and empty the queue."""
        for request in list(self._requests):
            request.settle(error)
        self._requests.clear()


class FailedBatch(list[AsapError]):
    """A rank's answer when its whole batch failed (the same error for every prompt), as opposed to
    per-prompt errors: in a sync step it means the rank left the step, so the other participants, held
    at the expert ranks' barrier for its dispatches, cannot finish it either."""


@dataclass(frozen=True, slots=True)
class RankResultItem:
    """What an attention rank returns for one prompt of a batch."""

    first_token_id: int
    first_token_logprob: float
    top_logprobs: list[tuple[int, float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RequestResult:
    """The answer to one request: its first token and where the time went."""

    request_id: str
    first_token_id: int
    first_token_logprob: float
    top_logprobs: list[tuple[int, float]]
    prompt_tokens: int
    queue_ms: float
    """Arrival -> batch sent to an attention rank."""
    ttft_ms: float
    """Arrival -> first token known."""
    attention_rank: int

    @classmethod
    def of(
        cls, request: ScheduledRequest, item: RankResultItem, rank: int, sent: float, done: float
    ) -> RequestResult:
        """The result of ``request`` answered by ``rank``; ``sent`` and ``done`` are ``asap.clock.monotonic()``."""
        return cls(
            request_id=request.request_id,
            first_token_id=item.first_token_id,
            first_token_logprob=item.first_token_logprob,
            top_logprobs=item.top_logprobs,
            prompt_tokens=item.prompt_tokens,
            queue_ms=(sent - request.arrival) * 1e3,
            ttft_ms=(done - request.arrival) * 1e3,
            attention_rank=rank,
        )


@dataclass(frozen=True, slots=True)
class RankSnapshot:
    """One attention rank in ``ClusterSnapshot``."""

    rank: int
    healthy: bool
    down_reason: str
    queued_requests: int
    """Placed on this rank, not yet sent (async mode places only on a free slot, so this stays ~0)."""
    queued_tokens: int
    running_batches: int
    running_requests: int
    running_tokens: int
    predicted_load_ms: float
    """Cost-model estimate of the work placed on this rank and not finished."""


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Point-in-time state of the scheduler core (``GetClusterState``)."""

    mode: str
    ranks: list[RankSnapshot]
    pending_requests: int
    """Waiting in the scheduler, not yet placed."""
    completed: int
    failed: int
    """Requests that ended with an error (deadline, unavailable rank, per-request error...)."""
    cancelled: int
    """Requests whose caller went away."""
