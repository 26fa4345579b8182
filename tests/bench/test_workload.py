"""Request sequences: determinism, arrival statistics, trace replay and time scaling, length specs."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from asap.bench.workload import (
    LengthSpec,
    Trace,
    WorkloadSpec,
    build_requests,
    default_warmup,
    sequence_digest,
)
from asap.errors import InvalidArgument

TRACE = Path(__file__).parents[1] / "data" / "trace_small.csv"


def gaps(spec: WorkloadSpec, rate: float) -> np.ndarray:
    times = np.array([r.send_at_s for r in build_requests(spec, rate, max_prompt_tokens=4096)])
    return np.diff(times)


def test_same_seed_same_sequence_other_seed_other_sequence() -> None:
    spec = WorkloadSpec(requests=200, seed=7)
    first = build_requests(spec, 3.0, max_prompt_tokens=4096)
    again = build_requests(WorkloadSpec(requests=200, seed=7), 3.0, max_prompt_tokens=4096)
    other = build_requests(WorkloadSpec(requests=200, seed=8), 3.0, max_prompt_tokens=4096)
    assert first == again
    assert first[5].token_ids(7, 320) == again[5].token_ids(7, 320)
    assert sequence_digest(first, 7) == sequence_digest(again, 7)
    assert [r.prompt_tokens for r in first] != [r.prompt_tokens for r in other]
    assert sequence_digest(first, 7) != sequence_digest(other, 8)


def test_rates_of_a_sweep_share_prompts_and_scale_gaps() -> None:
    spec = WorkloadSpec(requests=50, seed=1)
    slow, fast = (build_requests(spec, rate, max_prompt_tokens=4096) for rate in (1.0, 4.0))
    assert [r.prompt_tokens for r in slow] == [r.prompt_tokens for r in fast]
    assert [r.send_at_s for r in slow] == pytest.approx([4 * r.send_at_s for r in fast])


def test_poisson_mean_rate_and_cv() -> None:
    observed = gaps(WorkloadSpec(requests=20_000, seed=3), 8.0)
    assert 1 / observed.mean() == pytest.approx(8.0, rel=0.03)
    assert observed.std() / observed.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_hits_rate_and_burstiness(cv: float) -> None:
    observed = gaps(WorkloadSpec(arrival="gamma", burstiness=cv, requests=40_000, seed=4), 5.0)
    assert 1 / observed.mean() == pytest.approx(5.0, rel=0.05)
    assert observed.std() / observed.mean() == pytest.approx(cv, rel=0.08)


def test_trace_timestamps_parse_and_time_scale_to_the_target_rate() -> None:
    trace = Trace.load(TRACE)
    assert len(trace.times_s) == 300
    assert trace.times_s[0] == 0.0
    assert trace.times_s[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)
    assert list(trace.lengths[:3]) == [374, 396, 879]
    spec = WorkloadSpec(arrival="trace", trace=trace, requests=300)
    for rate in (0.5, 20.0):
        times = [r.send_at_s for r in build_requests(spec, rate, max_prompt_tokens=100_000)]
        assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(rate, rel=1e-9)
    native = build_requests(spec, None, max_prompt_tokens=100_000)
    assert [r.send_at_s for r in native] == pytest.approx(list(trace.times_s))
    assert [r.prompt_tokens for r in native] == list(trace.lengths)


def test_trace_wraps_around_and_duration_cuts_by_time() -> None:
    trace = Trace.load(TRACE)
    long = build_requests(
        WorkloadSpec(arrival="trace", trace=trace, requests=700), 10.0, max_prompt_tokens=4096
    )
    times = [r.send_at_s for r in long]
    assert times == sorted(times) and len(set(times)) == 700
    assert long[300].prompt_tokens == long[0].prompt_tokens
    timed = WorkloadSpec(duration_s=20.0, requests=None, warmup=5, seed=2)
    requests = build_requests(timed, 10.0, max_prompt_tokens=4096)
    measured = [r for r in requests if not r.warmup]
    assert sum(r.warmup for r in requests) == 5
    assert measured[-1].send_at_s - measured[0].send_at_s < 20.0
    assert 150 < len(measured) < 250


def test_trace_lengths_with_poisson_arrivals() -> None:
    trace = Trace.load(TRACE)
    requests = build_requests(WorkloadSpec(trace=trace, requests=10), 2.0, max_prompt_tokens=4096)
    assert [r.prompt_tokens for r in requests] == list(trace.lengths[:10])


def test_length_specs_and_clipping() -> None:
    def lengths(text: str, limit: int = 100_000, n: int = 20_000) -> np.ndarray:
        spec = WorkloadSpec(lengths=LengthSpec.parse(text), requests=n, seed=5)
        return np.array([r.prompt_tokens for r in build_requests(spec, 1.0, max_prompt_tokens=limit)])

    assert set(lengths("fixed:77", n=10)) == {77}
    uniform = lengths("uniform:10,20")
    assert uniform.min() == 10 and uniform.max() == 20
    lognormal = lengths("lognormal:1000,0.8")
    assert lognormal.mean() == pytest.approx(1000, rel=0.03)
    assert np.log(lognormal).std() == pytest.approx(0.8, rel=0.05)
    clipped = lengths("lognormal:1000,1.5", limit=512)
    assert clipped.max() == 512 and clipped.min() >= 1
    assert set(lengths("fixed:9000", limit=4096, n=5)) == {4096}


def test_token_ids_stay_in_the_vocabulary() -> None:
    (request,) = build_requests(
        WorkloadSpec(lengths=LengthSpec.parse("fixed:5000"), requests=1), 1.0, max_prompt_tokens=8192
    )
    ids = request.token_ids(0, 320)
    assert len(ids) == 5000 and min(ids) >= 0 and max(ids) < 320


@pytest.mark.parametrize(
    "text", ["fixed", "fixed:0", "uniform:5", "uniform:9,3", "lognormal:100,-1", "zipf:1", "fixed:x"]
)
def test_bad_length_specs_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        LengthSpec.parse(text)


def test_bad_workloads_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="needs --trace"):
        WorkloadSpec(arrival="trace")
    with pytest.raises(InvalidArgument, match="exactly one"):
        WorkloadSpec(requests=None)
    with pytest.raises(InvalidArgument, match="need a rate"):
        build_requests(WorkloadSpec(), None, max_prompt_tokens=10)


def test_warmup_and_default_warmup() -> None:
    requests = build_requests(WorkloadSpec(requests=20, warmup=2), 1.0, max_prompt_tokens=10)
    assert len(requests) == 22
    assert [r.warmup for r in requests[:3]] == [True, True, False]
    assert default_warmup(20, None, 1.0) == 2
    assert default_warmup(10_000, None, 1.0) == 50
    assert default_warmup(None, 30.0, 2.0) == 6


def _bursty_trace(path: Path) -> Trace:
    """Bursts of 10 requests within 0.1 s, 30 s apart: a window's local rate is far from the mean."""
    start = datetime(2024, 1, 1)
    stamps = [start + timedelta(seconds=30.0 * burst + 0.01 * i) for burst in range(8) for i in range(10)]
    rows = [f"{s:%Y-%m-%d %H:%M:%S.%f},{100 + i},1" for i, s in enumerate(stamps)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return Trace.load(path)


@pytest.mark.parametrize("warmup", [0, 7])
def test_a_bursty_trace_offers_the_target_rate_inside_the_measured_window(
    tmp_path: Path, warmup: int
) -> None:
    trace = _bursty_trace(tmp_path / "bursty.csv")
    spec = WorkloadSpec(arrival="trace", trace=trace, requests=None, duration_s=20.0, warmup=warmup)
    for rate in (4.0, 8.0, 16.0):
        requests = build_requests(spec, rate, max_prompt_tokens=4096)
        measured = [r for r in requests if not r.warmup]
        assert sum(r.warmup for r in requests) == warmup
        assert len(measured) == rate * 20.0
        assert all(0.0 <= r.send_at_s - measured[0].send_at_s < 20.0 for r in measured)
        times = [r.send_at_s for r in requests]
        assert times == sorted(times)
        assert [r.prompt_tokens for r in requests] == list(np.tile(trace.lengths, 5)[: len(requests)])
        # The shape is the trace's: every gap is the trace's gap times one scale (bursts stay bursts).
        lap_s = float(trace.times_s[-1]) + 1.0 / trace.mean_rate_rps
        native = np.concatenate([trace.times_s + lap * lap_s for lap in range(5)])[: len(requests)]
        scale = np.diff(times) / np.diff(native)
        assert scale == pytest.approx(np.full(len(scale), scale[0]))


def test_a_bursty_trace_measures_the_target_rate_with_requests_too(tmp_path: Path) -> None:
    trace = _bursty_trace(tmp_path / "bursty.csv")
    requests = build_requests(
        WorkloadSpec(arrival="trace", trace=trace, requests=25, warmup=15), 5.0, max_prompt_tokens=4096
    )
    measured = [r.send_at_s for r in requests if not r.warmup]
    assert len(measured) == 25
    assert (len(measured) - 1) / (measured[-1] - measured[0]) == pytest.approx(5.0, rel=1e-9)


def test_a_trace_at_its_own_speed_fills_the_window_by_time(tmp_path: Path) -> None:
    trace = _bursty_trace(tmp_path / "bursty.csv")
    # Rows 3.. at native timing: the rest of burst 0 (7 rows) and burst 1 (t = 30 s) lie within 40 s.
    requests = build_requests(
        WorkloadSpec(arrival="trace", trace=trace, requests=None, duration_s=40.0, warmup=3),
        None,
        max_prompt_tokens=4096,
    )
    measured = [r for r in requests if not r.warmup]
    assert len(measured) == 17
    assert [r.send_at_s for r in requests] == pytest.approx(list(trace.times_s[:20]))
