"""The checks behind a rate's warnings: offered rate against the target, host-bound emulated runs; and
that a sweep records and prints them (against the fake scheduler: no cluster)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from asap.bench import sweep as sweep_module
from asap.bench.checks import (
    host_bound_warning,
    offered_rate_warning,
    prefill_slowdown,
    suggested_dilation,
)
from asap.bench.report import format_table
from asap.bench.runner import RequestRecord
from asap.bench.stats import summarize
from asap.bench.sweep import BenchConfig, bench_client
from asap.bench.workload import LengthSpec, WorkloadSpec
from asap.cli import main
from asap.client import AsapClient
from tests.client.fake_scheduler import FakeScheduler, FakeSchedulerThread


def record(
    index: int, scheduled_s: float, *, ttft: float | None = 12.0, queue: float | None = 2.0, **kw: Any
) -> RequestRecord:
    fields: dict[str, Any] = {"warmup": False, "prompt_tokens": 100, "status": "OK"} | kw
    return RequestRecord(
        index=index,
        scheduled_s=scheduled_s,
        sent_s=scheduled_s,
        done_s=scheduled_s + 0.05,
        server_ttft_ms=ttft,
        queue_ms=queue,
        **fields,
    )


@pytest.mark.parametrize(
    ("rate", "offered", "warns"),
    [(10.0, 10.0, False), (10.0, 10.9, False), (10.0, 9.1, False), (10.0, 11.5, True), (10.0, 2.75, True)],
)
def test_an_offered_rate_more_than_10_percent_off_the_target_warns(
    rate: float, offered: float, warns: bool
) -> None:
    warning = offered_rate_warning(rate, offered)
    assert (warning is not None) == warns
    if warning is not None:
        assert warning.kind == "offered_rate"
        assert warning.to_json()["offered_rps"] == offered and warning.to_json()["rate_rps"] == rate
        assert f"target {rate:g} rps" in warning.message


def test_a_trace_at_its_own_speed_has_no_target_to_miss() -> None:
    assert offered_rate_warning(None, 123.0) is None


def test_the_offered_rate_of_a_duration_window_counts_the_whole_window() -> None:
    # 20 requests in the first second of a 10 s window: a burst, then nothing.
    records = [record(i, i * 0.05) for i in range(20)]
    assert summarize(2.0, records, 1000.0, window_s=10.0).offered_rps == pytest.approx(2.0)
    assert summarize(2.0, records, 1000.0).offered_rps == pytest.approx(19 / 0.95)


def test_prefill_slowdown_is_the_fastest_requests_ratio_to_its_model() -> None:
    records = [
        record(0, 0.0, ttft=12.0, queue=2.0),  # 10 ms of prefill
        record(1, 0.1, ttft=50.0, queue=10.0, prompt_tokens=200),  # 40 ms, modelled 4 ms
        record(2, 0.2, ttft=1.0, queue=0.5, warmup=True),  # warm-up: not counted
        record(3, 0.3, ttft=1.0, queue=0.5, status="UNAVAILABLE"),  # failed: not counted
        record(4, 0.4, ttft=None, queue=None),  # not timed by the server
    ]
    assert prefill_slowdown(records, lambda tokens: tokens / 100) == pytest.approx(10.0)
    assert prefill_slowdown(records[2:], lambda tokens: 1.0) is None


@pytest.mark.parametrize(
    ("current", "factor", "suggested"),
    [(1.0, 65.0, 100), (1.0, 10.0, 10), (1.0, 12.0, 20), (1.0, 1.5, 2), (20.0, 3.0, 100), (2.0, 10.0, 20)],
)
def test_the_suggested_dilation_is_round_and_covers_the_slowdown(
    current: float, factor: float, suggested: int
) -> None:
    assert suggested_dilation(current, factor) == suggested


def test_host_bound_runs_are_told_which_dilation_to_use() -> None:
    assert host_bound_warning("torch", 1.0, 100.0) is None  # real compute: the CPU is the device
    assert host_bound_warning(None, 1.0, 100.0) is None
    assert host_bound_warning("emulated:h200", 0.5, 3.0) is None  # neither sign
    busy = host_bound_warning("emulated:h200", 0.97, None)
    assert busy is not None and busy.kind == "host_bound"
    assert busy.to_json()["suggested_compute"] == "emulated:h200/10"
    assert "host CPU 97% busy" in busy.message and "--compute emulated:h200/10" in busy.message
    slow = host_bound_warning("emulated:h200/20", 0.3, 8.0)
    assert slow is not None and slow.to_json()["suggested_compute"] == "emulated:h200/200"
    assert "8x its modelled device time" in slow.message and "divided by 10" in slow.message
    assert slow.to_json()["slowdown"] == 8.0 and slow.to_json()["host_cpu_busy"] == 0.3


async def test_a_sweep_records_and_prints_host_bound_warnings(
    fake: tuple[FakeScheduler, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target = fake
    # The fake answers every request with 12.25 ms TTFT, 1.5 ms queued: 10.75 ms of prefill.
    monkeypatch.setattr(sweep_module, "_busy_since", lambda before: 0.95)
    modeled: Callable[[int], float] = lambda tokens: 0.5  # noqa: E731
    monkeypatch.setattr(sweep_module, "_modeled_request_ms", lambda state, compute: modeled)
    workload = WorkloadSpec(lengths=LengthSpec.parse("fixed:16"), requests=4, seed=1)
    config = BenchConfig(workload=workload, rates=[40.0], progress=False)
    async with AsapClient(target, retries=0) as client:
        emulated = await bench_client(client, config, compute="emulated:h200")
        real = await bench_client(client, config, compute="torch")
    (warning,) = [w for w in emulated.results[0].to_json()["warnings"] if w["kind"] == "host_bound"]
    assert warning["suggested_compute"] == "emulated:h200/50"  # 10.75 / 0.5 = 21.5 -> 50
    assert warning["slowdown"] == pytest.approx(21.5) and warning["host_cpu_busy"] == 0.95
    table = format_table({"async": emulated}, 5000.0)
    assert "WARNING: the host, not the emulated devices, limited this run" in table
    assert "--compute emulated:h200/50" in table
    assert [w["kind"] for w in real.results[0].warnings] in ([], ["offered_rate"])


@pytest.fixture
def served() -> Iterator[FakeSchedulerThread]:
    with FakeSchedulerThread() as fake_thread:
        fake_thread.fake.delay_s = 0.01
        yield fake_thread


def test_cli_duration_on_a_bursty_trace_offers_each_target_rate(
    served: FakeSchedulerThread, tmp_path: Path
) -> None:
    start = datetime(2024, 1, 1)
    stamps = [start + timedelta(seconds=30.0 * burst + 0.01 * i) for burst in range(4) for i in range(10)]
    trace = tmp_path / "bursty.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"{s:%Y-%m-%d %H:%M:%S.%f},32,1\n" for s in stamps)
    )
    out = tmp_path / "bench.json"
    argv = ["bench", "--target", served.target, "--trace", str(trace), "--sweep", "10,20", "--duration", "1"]
    assert main([*argv, "--warmup", "2", "--json", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["requests"] for r in results] == [10, 20]
    assert [r["offered_rps"] for r in results] == pytest.approx([10.0, 20.0])
    assert [w for r in results for w in r["warnings"] if w["kind"] == "offered_rate"] == []
