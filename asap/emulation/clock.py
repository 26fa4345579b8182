"""Sleeping for a modelled duration with sub-millisecond accuracy, without spinning.

``time.sleep`` on Linux overshoots by the thread's timer slack (50 µs by default) plus the wake-up
latency. An emulated cluster runs ~10 processes on a couple of cores, so busy-waiting to hide that would
steal CPU from the other ranks. ``Sleeper`` instead (1) sets the calling thread's timer slack to 1 ns
(``prctl(PR_SET_TIMERSLACK)``, Linux only, best effort) and (2) sleeps for the target minus the median
overshoot it measured (at start-up, then learned from every sleep), spinning the few µs it may wake
early. Measured on a 2-core VM: plain ``time.sleep`` overshoots by ~75 µs (median, 0.1-1 ms targets);
with 1 ns slack by ~40 µs; with the bias removed the median error is a few µs. The error is never
accumulated across calls: each call sleeps toward its own deadline, and never returns before it.

``begin`` moves that deadline to when the modelled work started: host work done between ``begin`` and
``sleep`` (an emulated part validating its ids, counting rows per expert, drawing routing) then runs
inside the modelled time instead of being added to it, as a device's kernels run while the host prepares
the next launch. The full modelled time is still charged: ``sleep`` never returns before ``begin`` +
its ``seconds``.

Opt-in (``ASAP_EMULATED_TAIL_SPIN_US``, off by default): a thread whose fast-plane wait may spin
(``allow_tail_spin``, set by ``asap.dataplane.spin``'s ``SpinBudget`` each time it decides: a free core,
the host's load below its cores) also spins the last stretch of each sleep, yielding the core between
looks: about the spread of the sleep's overshoot (a high quantile of it minus the bias, at most the cap).
Why: a sleep's wake-up is late at random (on the 2-core VM, idle: p10 34, p50 42, p90 65 µs for 0.4
ms); the bias removes only its low part, the rest lands on every modelled call of the emulated layer
(two per layer on 1+1). Measured in a quiet window (benchmarks/README.md, "CPU per-layer cost, round
7"): 10-18 µs off each of the two modelled hops in every pair, but the cluster's per-layer cost did not
improve in every pair, so it stays off unless asked.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping

from asap.errors import InvalidArgument

_PR_SET_TIMERSLACK = 29
_MAX_BIAS_S = 2e-4
_UP_S = 1e-6
_DOWN_S = 9e-6
"""The bias moves up by ``_UP_S`` after a sleep that overshot it and down by ``_DOWN_S`` after one that
did not: it settles where one sleep in ten overshoots less than the bias (and spins the difference)."""
TAIL_CAP_S = 3e-4
"""The suggested cap of the tail spin (``ASAP_EMULATED_TAIL_SPIN_US=300``), the one measured."""
TAIL_SPIN_ENV = "ASAP_EMULATED_TAIL_SPIN_US"
"""The cap of the tail spin in µs; unset or ``0``: never spin a tail (the default)."""
_HIGH_UP_S = 9e-6
_HIGH_DOWN_S = 1e-6
"""The high quantile of the overshoot moves up by ``_HIGH_UP_S`` after a sleep that overshot it and down
by ``_HIGH_DOWN_S`` after one that did not: it settles where one sleep in ten overshoots it."""
_local = threading.local()


def tail_spin_cap_s(environ: Mapping[str, str] | None = None) -> float:
    """The tail spin's cap from ``TAIL_SPIN_ENV`` (s; unset: 0, off); not a number >= 0: an error."""
    raw = (environ if environ is not None else os.environ).get(TAIL_SPIN_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise InvalidArgument(f"{TAIL_SPIN_ENV} must be a number of µs >= 0, got {raw!r}")
    return value * 1e-6


def allow_tail_spin(allowed: bool) -> None:
    """Whether the calling thread's next ``Sleeper`` sleeps may spin their last stretch (module doc)."""
    _local.tail_spin = allowed


def tail_spin_allowed() -> bool:
    """``allow_tail_spin``'s last word on the calling thread (False until it was called)."""
    return bool(getattr(_local, "tail_spin", False))


def reduce_timer_slack() -> bool:
    """Set this thread's timer slack to 1 ns (Linux). Returns whether it succeeded; cached per thread."""
    done = getattr(_local, "slack_set", None)
    if done is not None:
        return bool(done)
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
    _local.slack_set = ok
    return ok


def measure_overshoot(samples: int = 15, target_s: float = 2e-4) -> float:
    """Median time (s) by which ``time.sleep(target_s)`` overshoots on this thread (slack reduced first)."""
    reduce_timer_slack()
    overs = []
    for _ in range(samples):
        start = time.perf_counter()
        time.sleep(target_s)
        overs.append(time.perf_counter() - start - target_s)
    overs.sort()
    return max(0.0, overs[len(overs) // 2])


class Sleeper:
    """Sleeps for modelled durations, compensating the measured overshoot of ``time.sleep``.

    ``bias_s``: seconds subtracted from every sleep; ``None`` measures it now (~5 ms), clamped to
    [0, 200 µs]; each sleep then moves it toward a low quantile of the overshoots it observed. A sleep that woke before its
    deadline spins the rest (at most about the bias), so it never returns early. Where the thread's
    tail spin is allowed (``allow_tail_spin``) it also wakes ``tail_s`` earlier and spins that, yielding
    the core between looks, at most ``tail_cap_s`` (None: from ``TAIL_SPIN_ENV``). ``clock``, ``sleep``
    and ``yield_`` are injectable for tests.
    """

    def __init__(
        self,
        bias_s: float | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        yield_: Callable[[], None] = os.sched_yield,
        tail_cap_s: float | None = None,
    ) -> None:
        self.bias_s = min(max(measure_overshoot() if bias_s is None else bias_s, 0.0), _MAX_BIAS_S)
        self.high_s = self.bias_s
        """A high quantile (~0.9) of the overshoot, learned like the bias."""
        self._clock = clock
        self._sleep = sleep
        self._yield = yield_
        self.tail_cap_s = tail_spin_cap_s() if tail_cap_s is None else tail_cap_s
        self.requested_s = 0.0
        """Total seconds requested so far (for reports)."""
        self._began = threading.local()

    def begin(self, *, keep_pending: bool = False, at: float | None = None) -> None:
        """The modelled work of the calling thread starts now: its next ``sleep`` ends at this time plus
        its ``seconds`` (see the module doc), not at the time of that call plus them. ``keep_pending``: a
        ``begin`` of this thread that no ``sleep`` has used yet stands (an earlier start, set by the
        caller that prepared the work's inputs). ``at`` (this sleeper's clock, never later than now):
        it started then, e.g. when the work's inputs were taken."""
        if keep_pending and getattr(self._began, "at", None) is not None:
            return
        now = self._clock()
        self._began.at = now if at is None else min(at, now)

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for about ``seconds`` (no-op for <= 0), counted from the thread's last
        ``begin`` when there was one since its last ``sleep``."""
        began: float | None = getattr(self._began, "at", None)
        self._began.at = None
        if seconds <= 0:
            return
        self.requested_s += seconds
        reduce_timer_slack()
        now = self._clock()
        deadline = (now if began is None else min(began, now)) + seconds
        tail = self.tail_s if tail_spin_allowed() else 0.0
        remaining = deadline - now - self.bias_s - tail
        if remaining > 0:
            self._sleep(remaining)
            woke = self._clock()
            # Track a low quantile of the overshoot as the host's load changes (the start-up figure
            # drifts by tens of µs): a bias at the mean would wake early half the time and spin.
            over = woke - (now + remaining)
            step = _UP_S if over > self.bias_s else -_DOWN_S
            self.bias_s = min(max(self.bias_s + step, 0.0), _MAX_BIAS_S)
            high = _HIGH_UP_S if over > self.high_s else -_HIGH_DOWN_S
            self.high_s = min(max(self.high_s + high, self.bias_s), _MAX_BIAS_S + TAIL_CAP_S)
        if tail > 0:  # the tail: looks that give the core (and the GIL) away between them
            while self._clock() < deadline:
                self._yield()
            return
        # Woken before the deadline (the bias was too large, or a signal): spin the rest, at most about
        # the bias, so the full modelled time is always charged.
        while self._clock() < deadline:
            pass

    @property
    def tail_s(self) -> float:
        """How long before a deadline a sleep with its tail spin allowed wakes to spin (module doc)."""
        return min(max(self.high_s - self.bias_s, 0.0), self.tail_cap_s)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # the waiting task was cancelled meanwhile
        future.set_result(None)


async def charge(seconds: float) -> None:
    """Wait ``seconds`` on the event loop: what ``asyncio.sleep(seconds)`` does, in the same loop steps
    (a timer at ``loop.time() + seconds``, then the waiting task's wake-up), without cancelling the spent
    timer afterwards. Emulated transfers are charged this way, once per dispatch and once per result."""
    if seconds <= 0:
        await asyncio.sleep(seconds)
        return
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    timer = loop.call_at(loop.time() + seconds, _wake, future)
    try:
        await future
    except asyncio.CancelledError:
        timer.cancel()
        raise
