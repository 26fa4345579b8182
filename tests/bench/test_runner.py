"""The open-loop runner: sends keep their schedule however slow the responses are."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence

import pytest

from asap.bench.runner import CLIENT_ERROR, OK, RunOptions, run_requests
from asap.bench.sweep import BenchConfig, bench_client
from asap.bench.workload import BenchRequest, LengthSpec, WorkloadSpec
from asap.client import AsapClient, PrefillResult
from asap.errors import ResourceExhausted
from tests.client.fake_scheduler import FakeScheduler

Fake = tuple[FakeScheduler, str]


class SlowClient:
    """Answers after ``delay_s``; records when each prefill was called (loop time)."""

    def __init__(self, delay_s: float, fail_every: int = 0) -> None:
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.calls: list[float] = []
        self.slos: set[int | None] = set()

    async def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        ttft_slo_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        self.calls.append(asyncio.get_running_loop().time())
        self.slos.add(ttft_slo_ms)
        call = len(self.calls)
        await asyncio.sleep(self.delay_s)
        if self.fail_every and call % self.fail_every == 0:
            raise ResourceExhausted("queue full")
        if tokens is None:
            raise ValueError("no tokens")
        return PrefillResult(f"r{call}", 0, -1.0, (), len(tokens), self.delay_s * 500, 0.5, 0, "")


def schedule(times: Sequence[float], warmup: int = 0) -> list[BenchRequest]:
    return [BenchRequest(i, t, 8, i < warmup) for i, t in enumerate(times)]


async def test_sends_follow_the_schedule_while_responses_are_slow() -> None:
    client = SlowClient(delay_s=0.5)
    times = [i * 0.02 for i in range(20)]
    loop = asyncio.get_running_loop()
    records = await run_requests(client, schedule(times), RunOptions(seed=0, vocab_size=50, slo_ttft_ms=300))
    # All 20 were sent within ~0.4 s although each takes 0.5 s: a closed loop would need 10 s.
    first = client.calls[0]
    assert [c - first for c in client.calls] == pytest.approx(times, abs=0.1)  # slack for a loaded CI host
    assert loop.time() - first < 1.5
    assert all(r.ok and r.lag_ms < 100 for r in records)
    assert all(r.ttft_ms == pytest.approx(500, abs=150) for r in records)
    assert records[0].server_ttft_ms == 250.0 and client.slos == {300}


async def test_failures_are_recorded_by_status() -> None:
    client = SlowClient(delay_s=0.0, fail_every=3)
    records = await run_requests(client, schedule([0.0] * 9), RunOptions(seed=0, vocab_size=50))
    assert [r.status for r in records].count("RESOURCE_EXHAUSTED") == 3
    assert [r.status for r in records].count(OK) == 6


async def test_unexpected_client_exceptions_do_not_stop_the_run(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(SlowClient):
        async def prefill(
            self,
            *,
            tokens: Sequence[int] | None = None,
            ttft_slo_ms: int | None = None,
            timeout_s: float | None = None,
        ) -> PrefillResult:
            raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR):
        records = await run_requests(Broken(0.0), schedule([0.0, 0.0]), RunOptions(seed=0, vocab_size=50))
    assert [r.status for r in records] == [CLIENT_ERROR, CLIENT_ERROR]
    assert "request 0 failed in the client" in caplog.text


async def test_in_flight_limit_makes_lag_visible(caplog: pytest.LogCaptureFixture) -> None:
    client = SlowClient(delay_s=0.2)
    options = RunOptions(seed=0, vocab_size=50, max_in_flight=2)
    with caplog.at_level(logging.WARNING, logger="asap.bench.runner"):
        records = await run_requests(client, schedule([0.0, 0.01, 0.02, 0.03]), options)
    assert records[2].lag_ms > 150 and records[3].lag_ms > 150
    assert "behind schedule" in caplog.text


async def test_bench_client_against_the_fake_scheduler(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_s = 0.05
    workload = WorkloadSpec(lengths=LengthSpec.parse("uniform:1,400"), requests=12, warmup=2, seed=3)
    config = BenchConfig(workload=workload, rates=[50.0, 100.0], slo_ttft_ms=1000)
    progress = io.StringIO()
    async with AsapClient(target, retries=0) as client:
        sweep = await bench_client(client, config, progress_stream=progress)
    assert sweep.label == "async" and sweep.cluster["max_prompt_tokens"] == 4096
    assert servicer.prefill_calls == 28
    assert all(min(q.tokens.ids) >= 0 and max(q.tokens.ids) < 320 for q in servicer.requests)
    assert {q.ttft_slo_ms for q in servicer.requests} == {1000}
    for result in sweep.results:
        assert (result.requests, result.completed, result.failed, result.warmup) == (12, 12, 0, 2)
        assert result.slo_attainment == 1.0
    assert sweep.max_slo_rps == 100.0
    assert "async @ 50 rps: 100% 14/14 done" in progress.getvalue()
