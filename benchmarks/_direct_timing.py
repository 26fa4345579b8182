"""The attention hot path's round trips as ``gpu_dataplane.py --direct`` times them, on the posting
thread: a post, then polling and parking on the completion doorbell until its ticket settles (as
``attention_svc.direct_runner`` does), host-timed or with the host ahead of the device (``--host-ahead-us``:
behind a device sleep whose end is the dispatch's ready event), optionally under cProfile
(``--profile-post``). The lists below collect what the caller reads after each size."""

from __future__ import annotations

import cProfile
import dataclasses
import time
from collections.abc import Callable

import torch

from asap.dataplane.direct import DirectLink, Ticket, Wake
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.devices import attached_ready
from asap.errors import AsapError
from asap.model.placement import RankDispatch

__all__ = ["AHEAD", "DEVICE", "PROFILE", "VERDICTS", "timed_direct", "wait_for"]

TICKETS: list[Ticket] = []
"""The last hot-path ticket (``ASAP_GPU_HOST_FREE=1``: its verdict is waited for after its event)."""


def wait_for(link: DirectLink, wake: Wake, until: Callable[[], bool]) -> None:
    """Poll and park on the link's completion doorbell (as ``attention_svc.direct_runner`` does) until
    ``until()``."""
    poll, park = getattr(link, "poll", None), getattr(link, "park", None)
    while not until():
        wake.clear()
        if poll is not None:
            poll()
        if until():
            break
        fds = list(park(True)) if park is not None else []
        try:
            if poll is not None:
                poll()
            if not until():
                wake.wait(0.05 if fds else 200e-6, fds)
        finally:
            if park is not None:
                park(False)


def direct_once(link: DirectLink, wake: Wake, mb: int, dispatch: RankDispatch) -> torch.Tensor:
    """One dispatch on the hot path, on the calling thread (as ``attention_svc.direct_runner`` does):
    post, then poll and park on the completion doorbell until its ticket settles."""
    ticket = Ticket(wake)
    ticket.posted_ns = time.monotonic_ns()
    link.post(PlaneRequest(mb, 0, dispatch), ticket)
    wait_for(link, wake, lambda: ticket.done)
    TICKETS.append(ticket)
    outcome = ticket.outcome
    if isinstance(outcome, AsapError):
        raise outcome
    assert isinstance(outcome, ExchangeResult)
    return outcome.hidden


def _gate(us: float) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """Hold the current stream busy for ``us`` µs (a device sleep), then record a timing event: the
    host's post that follows is enqueued while the device is still busy, as in serving, where the
    attention rank posts a layer's dispatch right after enqueueing the kernels that produce it. Returns
    (the gate's end, an event for the caller to record once the results are usable on the stream)."""
    stream = torch.cuda.current_stream()
    khz = getattr(torch.cuda.get_device_properties(stream.device), "clock_rate", 0) or 1_980_000
    torch.cuda._sleep(int(us * khz / 1e3))
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record(stream)
    return start, torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def timed_direct(
    link: DirectLink, wake: Wake, mb: int, dispatch: RankDispatch, gate_us: float = 0.0
) -> tuple[torch.Tensor, float, float]:
    """``direct_once`` timed on its thread: (result, until settled, until its copy out ran) in s. With
    ``gate_us``, on a stream of its own behind a device sleep (``_gate``): the device-side round trip
    (the gate's end until the results are usable on the posting stream) goes to ``DEVICE``, and whether
    the host's post had returned before the gate ended to ``AHEAD``."""
    if gate_us > 0:
        with torch.cuda.stream(_posting_stream()):
            return _gated_direct(link, wake, mb, dispatch, gate_us)
    start = time.perf_counter()
    if PROFILE:  # --profile-post: the post and its wait under cProfile (slower: not a timing run)
        PROFILE[0].enable()
    hidden = direct_once(link, wake, mb, dispatch)
    if PROFILE:
        PROFILE[0].disable()
    returned = time.perf_counter() - start
    event = attached_ready(hidden)
    if event is not None:
        event.synchronize()
    elapsed = time.perf_counter() - start
    _await_verdict(link, wake, start)
    return hidden, returned, elapsed


PROFILE: list[cProfile.Profile] = []
"""``--profile-post``: the profiler of the hot path's host-timed round trips."""
_POSTING: list[torch.cuda.Stream] = []


def _posting_stream() -> torch.cuda.Stream:
    """The host-ahead round trips' stream (a non-blocking one, as a compute thread's is)."""
    if not _POSTING:
        _POSTING.append(torch.cuda.Stream())  # type: ignore[no-untyped-call]
    return _POSTING[0]


def _gated_direct(
    link: DirectLink, wake: Wake, mb: int, dispatch: RankDispatch, gate_us: float
) -> tuple[torch.Tensor, float, float]:
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.default_stream())  # the dispatch's tensors were made there
    gate_end, usable = _gate(gate_us)
    start = time.perf_counter()
    # the rows are "produced" at the gate's end: as an attention rank's dispatch, they carry its event
    hidden = direct_once(link, wake, mb, dataclasses.replace(dispatch, ready=gate_end))
    returned = time.perf_counter() - start
    AHEAD.append(not gate_end.query())  # type: ignore[no-untyped-call]
    event = attached_ready(hidden)
    if event is not None:
        stream.wait_event(event)
    usable.record(stream)
    usable.synchronize()  # type: ignore[no-untyped-call]
    elapsed = time.perf_counter() - start
    DEVICE.append(gate_end.elapsed_time(usable))  # type: ignore[no-untyped-call]
    _await_verdict(link, wake, start)
    return hidden, returned, elapsed


DEVICE: list[float] = []
"""Host-ahead round trips: ms on the device from the gate's end until the results were usable."""
AHEAD: list[bool] = []
"""Host-ahead round trips: whether the post had returned before the gate ended (the host was ahead)."""


def _await_verdict(link: DirectLink, wake: Wake, start: float) -> None:
    ticket = TICKETS.pop()
    if ticket.provisional:  # settled early: the round trip is over, its verdict is still to come
        wait_for(link, wake, lambda: ticket.confirmed)
        VERDICTS.append(time.perf_counter() - start)
        if ticket.failure is not None:
            raise ticket.failure


VERDICTS: list[float] = []
"""Early-settled round trips: seconds from the post until the verdict came (for the report)."""
