"""Min-size (length-aware) batching: hold requests until a batch is worth sending to the experts.

Expert compute is flat (launch/memory bound) below a token count and compute-bound above it (the *knee*,
measured by ``asap calibrate``): a batch below the knee costs the experts about as much as one at the
knee. ``MinBatchPolicy`` therefore holds the FIFO batch until it is worth sending, and places it as the
async policy does (the free healthy rank with the least predicted finish time).

Release rules, checked in order whenever a healthy rank has a free slot (otherwise nothing is sent):

1. **full**: the FIFO batch holds ``>= min_batch_tokens`` prompt tokens;
2. **cannot grow**: the batch is capped by ``max_batch_tokens`` / ``max_batch_prompts`` or the next pending
   request does not fit (strict FIFO never skips ahead), so waiting would not make it larger;
3. **waited enough**: some request of the batch reached its release time ``arrival + wait``, where
   ``wait = min(max_wait_ms, slo_fraction * ttft_slo_ms)`` for a request with a TTFT SLO and
   ``max_wait_ms`` without one. The minimum over the batch is taken, so a young request with a tight
   SLO is not held for the sake of an old one with a loose SLO.

0. **an idle rank**: a healthy rank with no batch running takes the batch at once. Holding only pays when
   the batch would share a busy rank anyway; at light load nothing is delayed.

Under load (no idle rank) a request waits at most its wait bound (a small fraction of its SLO) while
the batch fills towards the knee.

Times: ``now`` is event-loop time and ``ScheduledRequest.arrival`` is ``asap.clock.monotonic()``; both are
the same clock under asyncio's default loop (``loop.time()`` is ``time.monotonic()``) and under
``asap simulate``'s virtual one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from asap.errors import InvalidArgument
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.placement import BatchDecision, RankView, place_batch
from scheduler_svc.policy import take_fifo
from scheduler_svc.requests import ScheduledRequest

DEFAULT_MAX_WAIT_MS = 50.0
"""Cap of the hold time of any request (ms)."""
DEFAULT_SLO_FRACTION = 0.1
"""Share of a request's TTFT SLO it may spend held for batching."""


class MinBatchPolicy:
    """Async placement of FIFO batches that are held until they reach ``min_batch_tokens`` or a wait bound.

    Pure: decisions depend only on the arguments, so the policy is tested without a core or a clock.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        min_batch_tokens: int,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        slo_fraction: float = DEFAULT_SLO_FRACTION,
    ) -> None:
        if min_batch_tokens < 1:
            raise InvalidArgument(f"min_batch_tokens must be >= 1, got {min_batch_tokens}")
        if not max_wait_ms >= 0:  # also rejects NaN
            raise InvalidArgument(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not 0 < slo_fraction <= 1:
            raise InvalidArgument(f"slo_fraction must be in (0, 1], got {slo_fraction}")
        self._config = config
        self.min_batch_tokens = min_batch_tokens
        self.max_wait_ms = max_wait_ms
        self.slo_fraction = slo_fraction

    def wait_s(self, request: ScheduledRequest) -> float:
        """How long ``request`` may be held (s): the cap, shortened to a fraction of its TTFT SLO."""
        wait_ms = self.max_wait_ms
        if request.ttft_slo_ms is not None and request.ttft_slo_ms > 0:
            wait_ms = min(wait_ms, self.slo_fraction * request.ttft_slo_ms)
        return wait_ms / 1e3

    def release_time(self, batch: Sequence[ScheduledRequest]) -> float:
        """Loop time at which ``batch`` (non-empty) goes even if it stays small."""
        if not batch:
            raise InvalidArgument("release_time of an empty batch")
        return min(request.arrival + self.wait_s(request) for request in batch)

    def next_batch(
        self, pending: Iterable[ScheduledRequest], ranks: Sequence[RankView], now: float
    ) -> BatchDecision | None:
        """The FIFO batch placed on the best free rank if a release rule holds (module docstring), else
        ``None``: no free rank, nothing pending, or still holding (see ``wake_at``)."""
        if not any(view.healthy and view.free_slots > 0 for view in ranks):
            return None
        queue = list(pending)
        batch = self._fifo(queue)
        if not batch:
            return None
        idle = any(view.healthy and view.idle for view in ranks)
        if not idle and not self._ready(batch, queue) and now < self.release_time(batch):
            return None
        return place_batch(self._config, batch, ranks)

    def wake_at(self, pending: Sequence[ScheduledRequest], now: float) -> float | None:
        """When a held batch must be released although nothing else happens: its release time, if that is
        still ahead of ``now``. ``None`` when nothing is held (empty queue, a batch that is ready or past its
        release time: only a free rank, which is an event, can send it)."""
        queue = list(pending)
        batch = self._fifo(queue)
        if not batch or self._ready(batch, queue):
            return None
        when = self.release_time(batch)
        return when if when > now else None

    def _fifo(self, queue: list[ScheduledRequest]) -> list[ScheduledRequest]:
        return take_fifo(queue, self._config.max_batch_tokens, self._config.max_batch_prompts)

    def _ready(self, batch: list[ScheduledRequest], queue: list[ScheduledRequest]) -> bool:
        """Rules 1 and 2: the batch reached the threshold, or no amount of waiting can grow it."""
        tokens = sum(request.prompt_tokens for request in batch)
        return (
            tokens >= self.min_batch_tokens
            or tokens >= self._config.max_batch_tokens
            or len(batch) >= self._config.max_batch_prompts
            or len(batch) < len(queue)
        )
