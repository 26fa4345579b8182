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
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_TIMERSLACK = 29
_MAX_BIAS_S = 2e-4
_UP_S = 1e-6
_DOWN_S = 9e-6
"""The bias moves up by ``_UP_S`` after a sleep that overshot it and down by ``_DOWN_S`` after one that
did not: it settles where one sleep in ten overshoots less than the bias (and spins the difference)."""
_local = threading.local()


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
    deadline spins the rest (at most about the bias), so it never returns early. ``clock`` and
    ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        bias_s: float | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bias_s = min(max(measure_overshoot() if bias_s is None else bias_s, 0.0), _MAX_BIAS_S)
        self._clock = clock
        self._sleep = sleep
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
        remaining = deadline - now - self.bias_s
        if remaining > 0:
            self._sleep(remaining)
            woke = self._clock()
            # Track a low quantile of the overshoot as the host's load changes (the start-up figure
            # drifts by tens of µs): a bias at the mean would wake early half the time and spin.
            step = _UP_S if woke - (now + remaining) > self.bias_s else -_DOWN_S
            self.bias_s = min(max(self.bias_s + step, 0.0), _MAX_BIAS_S)
        # Woken before the deadline (the bias was too large, or a signal): spin the rest, at most about
        # the bias, so the full modelled time is always charged.
        while self._clock() < deadline:
            pass


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
