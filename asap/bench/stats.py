"""Per-rate statistics of a benchmark run, and the headline: max SLO-compliant RPS.

Definitions (warm-up requests are excluded from all of them):
    completed, failed     measured requests that succeeded / failed (any error status); they add up to
                          ``requests``
    throughput_rps        completed / span, span = first send -> last successful completion
    throughput_tok_s      prompt tokens of completed requests / span
    ttft_ms               client-side TTFT (scheduled send -> response) of completed requests:
                          mean, p50, p90, p99 (linear interpolation); None when nothing completed
    slo_attainment        fraction of ALL measured requests that completed within the SLO (a failure
                          is a miss)
    goodput_rps           completions within the SLO / span
    offered_rps           the scheduled rate of the measured requests: requests / window for a run
                          bounded by a duration, else requests-1 gaps / first-to-last send span
    max_slo_rps           over a sweep: the highest rate whose slo_attainment >= 0.9 (None if none)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asap.bench.runner import RequestRecord

SLO_ATTAINMENT_TARGET = 0.9


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """``{mean, p50, p90, p99}`` of ``values``; every entry None when there are none."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"mean": float(array.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


@dataclass(slots=True)
class RateResult:
    """The outcome at one target rate (field names are the JSON keys the README documents for asap bench --json)."""

    rate_rps: float | None
    """The target rate; None for a trace replayed at its own speed."""
    requests: int
    completed: int
    failed: int
    throughput_rps: float
    throughput_tok_s: float
    ttft_ms: dict[str, float | None]
    slo_attainment: float
    goodput_rps: float
    offered_rps: float
    """The rate actually scheduled (measured requests over their send window)."""
    server_ttft_ms: dict[str, float | None]
    queue_ms: dict[str, float | None]
    failures: dict[str, int] = field(default_factory=dict)
    """Failed requests by status (gRPC code name)."""
    client_lag_ms: dict[str, float] = field(default_factory=dict)
    """How late the client sent requests: p99 and max; large values mean the client was the limit."""
    warmup: int = 0
    sequence: str = ""
    """Fingerprint of the request sequence (equal across modes of a --compare)."""
    host_cpu_busy: float | None = None
    """Busy fraction of this host's CPUs (all processes) while this rate ran: near 1.0 means the host,
    not the (emulated) devices, may have limited the run."""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    """Checks this rate failed (``asap.bench.checks.BenchWarning.to_json``): why its numbers may not
    mean what the row says."""

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dump``."""
        return {
            "rate_rps": self.rate_rps,
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "failures": dict(self.failures),
            "throughput_rps": self.throughput_rps,
            "throughput_tok_s": self.throughput_tok_s,
            "ttft_ms": dict(self.ttft_ms),
            "slo_attainment": self.slo_attainment,
            "goodput_rps": self.goodput_rps,
            "offered_rps": self.offered_rps,
            "server_ttft_ms": dict(self.server_ttft_ms),
            "queue_ms": dict(self.queue_ms),
            "client_lag_ms": dict(self.client_lag_ms),
            "warmup": self.warmup,
            "sequence": self.sequence,
            "host_cpu_busy": self.host_cpu_busy,
            "warnings": [dict(w) for w in self.warnings],
        }


def summarize(
    rate_rps: float | None,
    records: Iterable[RequestRecord],
    slo_ttft_ms: float,
    *,
    sequence: str = "",
    window_s: float | None = None,
) -> RateResult:
    """Statistics of one rate's records against the TTFT SLO. ``window_s``: the measured window of a
    time-bounded run (``--duration``), over which the offered rate is counted."""
    all_records = list(records)
    measured = [r for r in all_records if not r.warmup]
    done = [r for r in measured if r.ok]
    within = [r for r in done if r.ttft_ms <= slo_ttft_ms]
    span_s = (max(r.done_s for r in done) - min(r.sent_s for r in measured)) if done else 0.0
    per_s = 1.0 / span_s if span_s > 0 else 0.0
    send_window = max((r.scheduled_s for r in measured), default=0.0) - min(
        (r.scheduled_s for r in measured), default=0.0
    )
    lags = [r.lag_ms for r in measured]
    return RateResult(
        rate_rps=rate_rps,
        requests=len(measured),
        completed=len(done),
        failed=len(measured) - len(done),
        throughput_rps=len(done) * per_s,
        throughput_tok_s=sum(r.prompt_tokens for r in done) * per_s,
        ttft_ms=percentiles([r.ttft_ms for r in done]),
        slo_attainment=len(within) / len(measured) if measured else 0.0,
        goodput_rps=len(within) * per_s,
        offered_rps=_offered_rps(len(measured), send_window, window_s),
        server_ttft_ms=percentiles([r.server_ttft_ms for r in done if r.server_ttft_ms is not None]),
        queue_ms=percentiles([r.queue_ms for r in done if r.queue_ms is not None]),
        failures=dict(Counter(r.status for r in measured if not r.ok)),
        client_lag_ms={
            "p99": float(np.percentile(lags, 99)) if lags else 0.0,
            "max": max(lags, default=0.0),
        },
        warmup=len(all_records) - len(measured),
        sequence=sequence,
    )


def _offered_rps(requests: int, send_window_s: float, window_s: float | None) -> float:
    """Requests over the window for a time-bounded run (the window, not the sends' span: a trace may
    leave its end empty); else requests-1 gaps over the first-to-last send span."""
    if window_s is not None:
        return requests / window_s if window_s > 0 else 0.0
    return (requests - 1) / send_window_s if send_window_s > 0 else 0.0


def max_slo_rps(results: Iterable[RateResult], target: float = SLO_ATTAINMENT_TARGET) -> float | None:
    """The highest target rate with ``slo_attainment >= target``; None if no rate meets it."""
    passing = [r.rate_rps for r in results if r.rate_rps is not None and r.slo_attainment >= target]
    return max(passing, default=None)
