"""The scheduler's request view: outcomes by code, and the times of successful requests."""

from __future__ import annotations

import asyncio

import pytest

from asap.errors import DeadlineExceeded, ResourceExhausted
from scheduler_svc.requests import RequestResult
from scheduler_svc.stats import RequestStats, outcome_code


def result(ttft_ms: float, queue_ms: float, tokens: int) -> RequestResult:
    return RequestResult("r", 1, -0.5, [], tokens, queue_ms=queue_ms, ttft_ms=ttft_ms, attention_rank=0)


def test_successes_fill_every_distribution() -> None:
    stats = RequestStats()
    stats.record_success(result(ttft_ms=30.0, queue_ms=10.0, tokens=64))
    stats.record_success(result(ttft_ms=3.0, queue_ms=1.0, tokens=16))
    assert stats.outcomes == {"OK": 2}
    assert stats.ttft_s.snapshot().sum == pytest.approx(0.033)
    assert stats.queue_s.snapshot().sum == pytest.approx(0.011)
    assert stats.prefill_s.snapshot().sum == pytest.approx(0.022)
    assert stats.prompt_tokens.snapshot().count == 2 and stats.prompt_tokens_total == 80


def test_failures_are_counted_by_code_and_time_nothing() -> None:
    stats = RequestStats()
    stats.record_failure(outcome_code(ResourceExhausted("full")))
    stats.record_failure(outcome_code(ResourceExhausted("full")))
    stats.record_failure(outcome_code(DeadlineExceeded("late")))
    stats.record_failure(outcome_code(asyncio.CancelledError()))
    stats.record_failure(outcome_code(RuntimeError("bug")))
    assert stats.outcomes == {
        "OK": 0,
        "RESOURCE_EXHAUSTED": 2,
        "DEADLINE_EXCEEDED": 1,
        "CANCELLED": 1,
        "UNKNOWN": 1,
    }
    assert stats.ttft_s.snapshot().count == 0
