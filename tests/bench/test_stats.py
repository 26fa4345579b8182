"""Statistics on synthetic records: counts, percentiles, SLO attainment with failures, max SLO RPS."""

from __future__ import annotations

import pytest

from asap.bench.runner import OK, RequestRecord
from asap.bench.stats import RateResult, max_slo_rps, percentiles, summarize


def record(
    index: int, ttft_ms: float, *, status: str = OK, warmup: bool = False, tokens: int = 100
) -> RequestRecord:
    scheduled = index * 0.1
    return RequestRecord(
        index=index,
        warmup=warmup,
        prompt_tokens=tokens,
        scheduled_s=scheduled,
        sent_s=scheduled,
        done_s=scheduled + ttft_ms / 1000,
        status=status,
        server_ttft_ms=ttft_ms / 2 if status == OK else None,
        queue_ms=1.0 if status == OK else None,
    )


def test_percentiles_are_ordered_and_empty_is_none() -> None:
    values = percentiles([float(v) for v in range(1, 101)])
    assert values["mean"] == pytest.approx(50.5)
    assert values["p50"] <= values["p90"] <= values["p99"]  # type: ignore[operator]
    assert values["p90"] == pytest.approx(90.1)
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_counts_add_up_and_failures_count_as_slo_misses() -> None:
    records = [record(0, 5000, warmup=True), record(1, 9000, warmup=True)]
    records += [record(2 + i, 100.0 + i) for i in range(6)]  # within the SLO
    records += [record(8, 900.0), record(9, 1200.0)]  # completed, late
    records += [record(10, 50.0, status="RESOURCE_EXHAUSTED"), record(11, 50.0, status="DEADLINE_EXCEEDED")]
    result = summarize(4.0, records, slo_ttft_ms=500.0)
    assert (result.requests, result.completed, result.failed, result.warmup) == (10, 8, 2, 2)
    assert result.failures == {"RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 1}
    assert result.slo_attainment == pytest.approx(6 / 10)
    span = (9 * 0.1 + 1.2) - 2 * 0.1  # first measured send -> last completion
    assert result.throughput_rps == pytest.approx(8 / span)
    assert result.goodput_rps == pytest.approx(6 / span)
    assert result.throughput_tok_s == pytest.approx(800 / span)
    assert result.ttft_ms["mean"] == pytest.approx((sum(100.0 + i for i in range(6)) + 2100) / 8)
    assert result.server_ttft_ms["mean"] == pytest.approx(result.ttft_ms["mean"] / 2)  # type: ignore[operator]
    assert result.offered_rps == pytest.approx(9 / 0.9)


def test_nothing_completed() -> None:
    result = summarize(1.0, [record(i, 10, status="UNAVAILABLE") for i in range(4)], slo_ttft_ms=100)
    assert (result.completed, result.failed, result.slo_attainment) == (0, 4, 0.0)
    assert result.throughput_rps == 0.0 and result.ttft_ms["p99"] is None


def test_lag_is_reported() -> None:
    late = record(0, 100)
    late.sent_s = late.scheduled_s + 0.25
    result = summarize(1.0, [late, record(1, 100)], slo_ttft_ms=1000)
    assert result.client_lag_ms["max"] == pytest.approx(250.0)


def rate_result(rate: float | None, attainment: float) -> RateResult:
    empty = percentiles([])
    return RateResult(rate, 10, 10, 0, 1.0, 1.0, empty, attainment, 1.0, rate or 0.0, empty, empty)


def test_max_slo_rps_is_the_highest_rate_at_90_percent() -> None:
    results = [rate_result(1, 1.0), rate_result(2, 0.95), rate_result(4, 0.9), rate_result(8, 0.5)]
    assert max_slo_rps(results) == 4
    # Non-monotone (noisy) sweeps: still the highest passing rate, listed in any order.
    assert max_slo_rps([rate_result(8, 0.91), rate_result(2, 0.99), rate_result(4, 0.8)]) == 8
    assert max_slo_rps([rate_result(1, 0.89)]) is None
    assert max_slo_rps([rate_result(None, 1.0)]) is None
