"""A short, bounded spin before a consumer parks, for a wait whose answer is due within about the modelled
compute time (the attention compute thread waiting for a layer's answers, an emulated expert rank's poll
thread waiting for the next layer's descriptor).

Why: a parked consumer is woken across cores (a ``FUTEX_WAKE`` or a doorbell write), and on the 2-core VM
waking an idle vCPU is the hypervisor's cost: 0.2-0.45 ms for the request hop and 0.1-0.2 ms for the
completion hop of every layer on 1+1 (benchmarks/README.md, "CPU per-layer cost, round 5"). A consumer
still running when the record lands sees it at its next look, with no wake-up on the critical path.

Why bounded and adaptive: a spinning thread takes a core, and on a host with fewer cores than busy
ranks it takes the one a peer needs. So a ``SpinBudget`` spins only

1. when the caller's peers and itself fit the cores it may run on (``peers + 1 <= cores``: 1+1 on two
   cores does, 4+4 does not) and, unless the cap was set explicitly, while the host's load average
   (1 min, read at most once a second) is below its core count: a host that others keep busy has no
   free core to spin on (measured on the shared 2-core VM at load 4-8: the spin only took CPU from
   the peer, benchmarks/README.md "CPU per-layer cost, round 6");
2. for about as long as its recent waits lasted (``SPAN`` x their median), and not at all when that
   median is above the cap (the answer would not come within the spin);
3. while spins pay: after ``MISS_LIMIT`` spins in a row that ended without the record it rests for
   ``REST_WAITS`` waits (parking at once) and then tries again.

Between two looks the spinner gives its core away (``os.sched_yield``, which also releases the GIL), so
a runnable thread of another process or of its own process is not held off for the whole spin.
``ASAP_FAST_SPIN_US``: ``auto`` (the default: cap ``DEFAULT_CAP_S``, load-gated), a cap in µs (an
operator who knows the host has cores to spare: no load gate), or ``0`` / ``off``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping

from asap.emulation.clock import allow_tail_spin
from asap.errors import InvalidArgument

__all__ = [
    "DEFAULT_CAP_S",
    "MISS_LIMIT",
    "REST_WAITS",
    "SPAN",
    "SPIN_ENV",
    "SpinBudget",
    "spin_cap_s",
    "spin_setting",
]

SPIN_ENV = "ASAP_FAST_SPIN_US"
DEFAULT_CAP_S = 1.5e-3
"""The longest spin: a little above the 1+1 layer's waits on the emulated h200 model (an attention layer
or an expert call of ~0.5 ms plus the hops around it)."""
SPAN = 1.5
"""A spin lasts up to this many times the median of the recent waits (waits vary by tens of %)."""
MISS_LIMIT = 4
"""Spins in a row that ended without the record before the budget rests."""
REST_WAITS = 64
"""Waits that park at once after ``MISS_LIMIT`` misses (then one spin probes again)."""
_WINDOW = 16
_LOAD_EVERY_S = 1.0
_MIN_SAMPLES = 4


def spin_setting(environ: Mapping[str, str] | None = None) -> tuple[float, bool]:
    """``ASAP_FAST_SPIN_US`` as (cap in s, load-gated): unset or ``auto`` ``(DEFAULT_CAP_S, True)``, a
    number of µs ``(that, False)``, ``0`` / ``off`` ``(0, False)``."""
    raw = (environ if environ is not None else os.environ).get(SPIN_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return DEFAULT_CAP_S, True
    if raw in ("off", "no", "false"):
        return 0.0, False
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{SPIN_ENV} must be a number of µs, 'auto' or 'off', got {raw!r}") from None
    if value < 0:
        raise InvalidArgument(f"{SPIN_ENV} must be >= 0, got {raw!r}")
    return value * 1e-6, False


def spin_cap_s(environ: Mapping[str, str] | None = None) -> float:
    """The spin cap from ``ASAP_FAST_SPIN_US`` (µs; unset or ``auto``: ``DEFAULT_CAP_S``; ``0``: off)."""
    return spin_setting(environ)[0]


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SpinBudget:
    """How long one consumer spins before it parks (see the module doc). One per waiting thread; not
    thread-safe. ``cap_s`` None: from ``ASAP_FAST_SPIN_US``; ``load_gated`` None: as that setting says
    (an explicit ``cap_s`` is not gated unless asked). ``clock``, ``yield_`` and ``load`` (the 1-minute
    load average) are injectable for tests."""

    def __init__(
        self,
        cap_s: float | None = None,
        *,
        cores: int | None = None,
        load_gated: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        yield_: Callable[[], None] = os.sched_yield,
        load: Callable[[], float] = _load,
    ) -> None:
        env_cap, env_gated = spin_setting()
        self.cap_s = env_cap if cap_s is None else cap_s
        self.load_gated = (env_gated if cap_s is None else False) if load_gated is None else load_gated
        self.cores = _cores() if cores is None else cores
        self._load = load
        self._load_at = -1.0
        self._loaded = False
        self._clock = clock
        self._yield = yield_
        self._waits: deque[float] = deque(maxlen=_WINDOW)
        self._median = 0.0
        self._misses = 0
        self._rest = 0
        self.spins = 0
        """Spins begun (for tests and benchmarks)."""
        self.hits = 0
        """Spins that ended with the record."""

    def observe(self, waited_s: float) -> None:
        """One wait's length, from when the consumer began waiting to the record seen (spun or parked)."""
        self._waits.append(max(0.0, waited_s))
        if len(self._waits) >= _MIN_SAMPLES:
            self._median = statistics.median(self._waits)

    def budget_s(self, peers: int) -> float:
        """How long the next wait may spin (0: park at once); counts a rest wait down. Also tells the
        calling thread's emulated sleeps whether they may spin their tail (``allow_tail_spin``): when
        a core is free for this caller (the cap, the cores and the load gates), whatever the waits."""
        free = self.cap_s > 0 and peers >= 1 and peers + 1 <= self.cores
        if free and self.load_gated:
            free = not self._host_busy()
        allow_tail_spin(free)
        if not free or len(self._waits) < _MIN_SAMPLES:
            return 0.0
        if self._rest > 0:
            self._rest -= 1
            return 0.0
        if self._median > self.cap_s:
            return 0.0
        return min(self.cap_s, SPAN * self._median)

    def _host_busy(self) -> bool:
        """Whether the host's 1-minute load average is at or above its cores (read at most once a second)."""
        now = self._clock()
        if self._load_at < 0 or now - self._load_at >= _LOAD_EVERY_S:
            self._load_at = now
            self._loaded = self._load() >= self.cores
        return self._loaded

    def spin(self, ready: Callable[[], bool], peers: int) -> bool:
        """Look at ``ready`` until it is true or the budget is spent, yielding the core between looks;
        whether it became true. Does not ``observe`` (the caller knows when its wait began)."""
        budget = self.budget_s(peers)
        if budget <= 0:
            return False
        self.spins += 1
        clock = self._clock
        end = clock() + budget
        while True:
            if ready():
                self.hits += 1
                self._misses = 0
                return True
            if clock() >= end:
                break
            self._yield()
        self._misses += 1
        if self._misses >= MISS_LIMIT:
            self._misses = 0
            self._rest = REST_WAITS
        return False
