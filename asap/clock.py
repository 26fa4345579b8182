"""The clock services read for the durations and timestamps they compare with event-loop time.

Under asyncio's default loop ``loop.time()`` is ``time.monotonic()``, and the scheduler mixes the two
(arrival stamps, batch send times, per-request wait bounds); the expert ranks time their barrier and
queue waits with it. ``asap simulate`` runs those same services on a virtual clock (``asap.sim.loop``):
it installs that clock here with ``use`` so that every such reading is virtual time too. Nothing else
changes: without ``use`` these are ``time.monotonic`` / ``time.monotonic_ns`` / ``time.perf_counter``.

Wall-clock timestamps for spans (``time.time_ns``) are not routed through here: they only label traces.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

__all__ = ["monotonic", "monotonic_ns", "perf_counter", "use"]

_source: Callable[[], float] | None = None


def monotonic() -> float:
    """Seconds on the services' clock (``time.monotonic()`` unless a clock is installed)."""
    return time.monotonic() if _source is None else _source()


def monotonic_ns() -> int:
    """Nanoseconds on the services' clock (``time.monotonic_ns()`` unless a clock is installed)."""
    return time.monotonic_ns() if _source is None else round(_source() * 1e9)


def perf_counter() -> float:
    """A duration timer (``time.perf_counter()`` unless a clock is installed)."""
    return time.perf_counter() if _source is None else _source()


@contextlib.contextmanager
def use(source: Callable[[], float]) -> Iterator[None]:
    """Install ``source`` (seconds) as the services' clock for the block; not re-entrant across threads:
    one process runs one simulation at a time."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
