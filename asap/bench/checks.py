"""Checks that a rate's numbers measure what they claim to. A failed check is a ``BenchWarning``: logged
when found, printed under its row of the table and kept in the JSON (``warnings`` of each rate).

offered rate   the measured window was offered within ``OFFERED_RATE_TOLERANCE`` of the target rate; it
               is not when a trace's local rate, or random arrivals over a short window, drift from it.
host bound     an emulated run in which the host, not the emulated devices, set the pace: the host's
               CPUs were at least ``BOTTLENECK_THRESHOLD`` busy, or requests took over
               ``SLOWDOWN_LIMIT`` times their modelled device time (``costs.request_s``, per layer the
               same ratio). Dilating time (``emulated:DEVICE/F``) makes the modelled devices F times
               slower, so the same host keeps up; the warning suggests an F.

Pure functions: the sweep measures, these judge. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from asap.bench.runner import RequestRecord
from asap.emulation.cpu_check import BOTTLENECK_THRESHOLD
from asap.emulation.profiles import emulated_device

OFFERED_RATE_TOLERANCE = 0.10
"""Largest relative difference between the offered and the target rate that passes without a warning."""
SLOWDOWN_LIMIT = 5.0
"""Measured prefill over modelled device time beyond which an emulated run is taken as host-bound: even
the fastest request of the rate took that many times its modelled time."""
_BUSY_ONLY_FACTOR = 10.0
"""Dilation to suggest (times the current one) when only the CPU load shows the host was the limit, so
there is no measure of by how much."""


@dataclass(frozen=True, slots=True)
class BenchWarning:
    """One failed check of one rate: ``kind`` is ``offered_rate`` or ``host_bound``."""

    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


def offered_rate_warning(rate_rps: float | None, offered_rps: float) -> BenchWarning | None:
    """A warning when the measured window's offered rate is more than 10% off the target (None: the
    trace's own speed, nothing to compare with)."""
    if rate_rps is None or not rate_rps > 0:
        return None
    off = offered_rps / rate_rps - 1.0
    if abs(off) <= OFFERED_RATE_TOLERANCE:
        return None
    return BenchWarning(
        "offered_rate",
        f"the measured window was offered {offered_rps:.3g} rps, {off:+.0%} off the target {rate_rps:g} rps: "
        "this row is not a measurement at its rate",
        {"rate_rps": rate_rps, "offered_rps": offered_rps},
    )


def prefill_slowdown(records: Iterable[RequestRecord], modeled_ms: Callable[[int], float]) -> float | None:
    """The smallest ratio of a measured request's prefill time on the server (TTFT minus queueing) to its
    modelled device time ``modeled_ms(prompt_tokens)``; None without a completed, timed request.

    The smallest, because batching and queueing inside the ranks only add to a request's time: when even
    the fastest request is far above its model, the devices were not what limited it.
    """
    ratios = [
        (record.server_ttft_ms - record.queue_ms) / modeled
        for record in records
        if record.ok
        and not record.warmup
        and record.server_ttft_ms is not None
        and record.queue_ms is not None
        if (modeled := modeled_ms(record.prompt_tokens)) > 0
    ]
    return min(ratios, default=None)


def suggested_dilation(current: float, factor: float) -> int:
    """The next round dilation (1, 2 or 5 times a power of ten) at or above ``current * factor``."""
    needed = max(current * factor, 2.0)
    decade = 10 ** math.floor(math.log10(needed))
    return int(next(step * decade for step in (1, 2, 5, 10) if step * decade >= needed - 1e-9))


def host_bound_warning(
    compute: str | None, host_cpu_busy: float | None, slowdown: float | None
) -> BenchWarning | None:
    """A warning, with the ``--compute`` value to run instead, when an emulated run was host-bound by
    either sign; None for real compute or when neither sign is there."""
    device = emulated_device(compute) if compute and compute.startswith("emulated") else None
    if device is None:
        return None
    busy = host_cpu_busy is not None and host_cpu_busy >= BOTTLENECK_THRESHOLD
    slow = slowdown is not None and slowdown > SLOWDOWN_LIMIT
    if not (busy or slow):
        return None
    name, dilation = device
    current = dilation or 1.0
    factor = slowdown if slow and slowdown is not None else _BUSY_ONLY_FACTOR
    suggested = f"emulated:{name}/{suggested_dilation(current, factor)}"
    reasons = []
    if busy and host_cpu_busy is not None:
        reasons.append(f"host CPU {host_cpu_busy:.0%} busy")
    if slow and slowdown is not None:
        reasons.append(f"the fastest request took {slowdown:.0f}x its modelled device time")
    slower = suggested_dilation(current, factor) / current
    return BenchWarning(
        "host_bound",
        f"the host, not the emulated devices, limited this run ({'; '.join(reasons)}): its latencies and "
        f"rates say little about {compute}. Re-run with --compute {suggested} and the rates divided by "
        f"{slower:g} (latencies then come out {slower:g} times longer)",
        {"host_cpu_busy": host_cpu_busy, "slowdown": slowdown, "suggested_compute": suggested},
    )
