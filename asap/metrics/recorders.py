"""Recorders the cores update on their hot paths: a fixed-bucket distribution and a busy clock.

Both are plain Python objects updated from one thread (the event loop, or the one compute thread that
owns them); a scrape reads them from another thread. They take no lock: an observation costs a bisect
and two additions. A snapshot is made consistent by construction (its count is the sum of its bucket
counts), so a scrape that races an observation sees it either fully in the buckets or not at all, and
at worst the sum lags one observation behind.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asap.errors import InternalError, InvalidArgument

__all__ = [
    "EXCHANGE_BUCKETS_S",
    "PREFILL_BUCKETS_S",
    "TOKEN_BUCKETS",
    "BusyClock",
    "Distribution",
    "DistributionSnapshot",
]

PREFILL_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
"""Request-level times (TTFT, queue, prefill): 1 ms (an emulated short prompt) to 60 s (a long prompt
queued behind others), denser below 1 s where TTFT SLOs sit; vLLM's TTFT buckets span the same range."""

EXCHANGE_BUCKETS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""One layer's round trip to an expert rank: 50 µs (the fast plane, tiny rows) to 2.5 s (a large
real-compute dispatch on CPU)."""

TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(4, 18))
"""Prompt lengths: 16 to 131072 tokens, powers of two (vLLM's ``request_prompt_tokens`` uses 1-2-5 steps
up to the model's context; powers of two match the batch token limits here)."""


@dataclass(frozen=True, slots=True)
class DistributionSnapshot:
    """A distribution at one moment, in Prometheus' shape."""

    bounds: tuple[float, ...]
    """Upper bounds of the finite buckets (``le``), ascending."""
    cumulative: tuple[int, ...]
    """Observations <= each bound, then the total (the ``+Inf`` bucket): ``len(bounds) + 1`` values."""
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Distribution:
    """Counts of observations per bucket and their sum (a Prometheus histogram without the lock)."""

    __slots__ = ("_counts", "_sum", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or list(ordered) != sorted(set(ordered)):
            raise InvalidArgument(f"bucket bounds must be ascending and distinct, got {list(bounds)}")
        self.bounds = ordered
        self._counts = [0] * (len(ordered) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it (Prometheus' ``le``)."""
        self._counts[bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> DistributionSnapshot:
        counts = list(self._counts)  # one copy, so the cumulative sums agree with each other
        total = 0
        cumulative = []
        for count in counts:
            total += count
            cumulative.append(total)
        return DistributionSnapshot(self.bounds, tuple(cumulative), self._sum)


class BusyClock:
    """Time during which at least one piece of work was in progress (``begin`` ... ``end`` pairs may
    overlap): the busy fraction of a rank is this time's rate."""

    __slots__ = ("_active", "_busy_ns", "_clock", "_since")

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._active = 0
        self._since = 0
        self._busy_ns = 0

    @property
    def active(self) -> int:
        """Pieces of work in progress now."""
        return self._active

    def begin(self) -> None:
        if self._active == 0:
            self._since = self._clock()
        self._active += 1

    def end(self) -> None:
        if self._active <= 0:
            raise InternalError("BusyClock.end without a matching begin")
        self._active -= 1
        if self._active == 0:
            self._busy_ns += self._clock() - self._since

    def busy_ns(self) -> int:
        """Busy time so far, including the interval in progress."""
        busy, active, since = self._busy_ns, self._active, self._since
        return busy + (self._clock() - since if active else 0)
