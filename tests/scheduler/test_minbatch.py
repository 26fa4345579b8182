"""MinBatchPolicy: hold/release decisions at the boundaries, SLO-derived waits, wake times, placement."""

from __future__ import annotations

import pytest

from asap.errors import InvalidArgument
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.minbatch import MinBatchPolicy
from scheduler_svc.placement import RankView
from scheduler_svc.policy import AsyncBatchPolicy, next_wake
from scheduler_svc.requests import ScheduledRequest

T0 = 1000.0
FREE = [RankView(healthy=True, free_slots=1, predicted_load_ms=5.0, idle=False)]
"""A rank with a free slot that is already running a batch: the only case where holding pays."""


def _req(tokens: int, arrival: float = T0, slo_ms: float | None = None, name: str = "r") -> ScheduledRequest:
    return ScheduledRequest(request_id=name, token_ids=[1] * tokens, ttft_slo_ms=slo_ms, arrival=arrival)


def _policy(
    min_tokens: int = 1000,
    max_wait_ms: float = 50.0,
    slo_fraction: float = 0.1,
    *,
    max_batch_tokens: int = 8192,
    max_batch_prompts: int = 64,
) -> MinBatchPolicy:
    config = SchedulerConfig(max_batch_tokens=max_batch_tokens, max_batch_prompts=max_batch_prompts)
    return MinBatchPolicy(config, min_tokens, max_wait_ms, slo_fraction)


def test_below_threshold_waits_and_names_its_wake_time() -> None:
    policy, pending = _policy(), [_req(600), _req(399)]
    assert policy.next_batch(pending, FREE, T0) is None
    assert policy.next_batch(pending, FREE, T0 + 0.049) is None
    assert policy.wake_at(pending, T0) == pytest.approx(T0 + 0.050)


def test_reaching_the_threshold_releases_at_once() -> None:
    policy, pending = _policy(), [_req(600), _req(400)]
    decision = policy.next_batch(pending, FREE, T0)
    assert decision is not None and decision.requests == pending
    assert policy.wake_at(pending, T0) is None


def test_a_single_prompt_over_the_threshold_goes_alone_at_once() -> None:
    decision = _policy().next_batch([_req(5000)], FREE, T0)
    assert decision is not None and [r.prompt_tokens for r in decision.requests] == [5000]


def test_max_wait_releases_a_small_batch() -> None:
    policy, pending = _policy(), [_req(10), _req(10, arrival=T0 + 0.02)]
    decision = policy.next_batch(pending, FREE, T0 + 0.050)
    assert decision is not None and decision.requests == pending
    assert policy.wake_at(pending, T0 + 0.050) is None  # past its release: only an event matters now


def test_slo_derived_wait_is_shorter_than_the_cap() -> None:
    policy = _policy(max_wait_ms=50.0, slo_fraction=0.1)
    tight = [_req(10, slo_ms=200.0)]  # 0.1 * 200 ms = 20 ms < 50 ms
    assert policy.wait_s(tight[0]) == pytest.approx(0.020)
    assert policy.wake_at(tight, T0) == pytest.approx(T0 + 0.020)
    assert policy.next_batch(tight, FREE, T0 + 0.019) is None
    assert policy.next_batch(tight, FREE, T0 + 0.020) is not None


def test_loose_slo_and_no_slo_use_the_cap() -> None:
    policy = _policy(max_wait_ms=50.0, slo_fraction=0.1)
    assert policy.wait_s(_req(10, slo_ms=5000.0)) == pytest.approx(0.050)
    assert policy.wait_s(_req(10)) == pytest.approx(0.050)


def test_a_young_tight_slo_request_bounds_the_whole_batch() -> None:
    policy = _policy()
    pending = [_req(10, arrival=T0), _req(10, arrival=T0 + 0.010, slo_ms=100.0)]  # releases at T0+20ms
    assert policy.wake_at(pending, T0) == pytest.approx(T0 + 0.020)
    assert policy.next_batch(pending, FREE, T0 + 0.0199) is None
    assert policy.next_batch(pending, FREE, T0 + 0.020) is not None


def test_a_batch_that_cannot_grow_goes_at_once() -> None:
    # The next request does not fit under max_batch_tokens: waiting cannot make the batch larger.
    policy = _policy(min_tokens=1000, max_batch_tokens=800)
    pending = [_req(500), _req(400)]
    decision = policy.next_batch(pending, FREE, T0)
    assert decision is not None and [r.prompt_tokens for r in decision.requests] == [500]
    # The prompt cap is reached.
    capped = _policy(max_batch_prompts=2)
    decision = capped.next_batch([_req(10), _req(10)], FREE, T0)
    assert decision is not None and len(decision.requests) == 2


def test_threshold_above_max_batch_tokens_releases_at_the_cap() -> None:
    policy = _policy(min_tokens=10_000, max_batch_tokens=1000)
    assert policy.next_batch([_req(1000)], FREE, T0) is not None
    # A batch filled to the token cap cannot reach the threshold: it goes at once, the cap's worth only.
    pending = [_req(600, name="a"), _req(400, name="b"), _req(10, name="c")]
    decision = policy.next_batch(pending, FREE, T0)
    assert decision is not None and [r.request_id for r in decision.requests] == ["a", "b"]
    assert decision.rank == 0 and decision.predicted_ms > 0
    # Below the cap it still waits (for the threshold or max wait), as any below-threshold batch does.
    assert policy.next_batch([_req(999)], FREE, T0) is None


def test_no_free_rank_sends_nothing_and_waits_for_an_event() -> None:
    busy = [RankView(True, 0, 5.0), RankView(False, 2, 0.0)]
    policy, pending = _policy(), [_req(2000)]
    assert policy.next_batch(pending, busy, T0) is None
    assert policy.wake_at(pending, T0) is None  # ready: a free slot (an event) is what it waits for


def test_empty_queue() -> None:
    policy = _policy()
    assert policy.next_batch([], FREE, T0) is None
    assert policy.wake_at([], T0) is None


def test_placement_is_least_predicted_finish_among_free_ranks() -> None:
    ranks = [
        RankView(True, 1, 30.0),
        RankView(True, 0, 0.0),
        RankView(True, 2, 10.0),
        RankView(False, 2, 0.0),
    ]
    decision = _policy().next_batch([_req(1500)], ranks, T0)
    assert decision is not None and decision.rank == 2 and decision.predicted_ms > 0


def test_wake_at_never_returns_a_time_not_after_now() -> None:
    policy, pending = _policy(), [_req(10)]
    for now in (T0, T0 + 0.0499, T0 + 0.05, T0 + 1.0):
        wake = policy.wake_at(pending, now)
        assert wake is None or wake > now


def test_next_wake_asks_only_policies_that_can_wait() -> None:
    pending = [_req(10)]
    assert next_wake(AsyncBatchPolicy(SchedulerConfig()), pending, T0) is None
    assert next_wake(_policy(), pending, T0) == pytest.approx(T0 + 0.050)


def test_zero_wait_degenerates_to_the_async_policy() -> None:
    decision = _policy(max_wait_ms=0.0).next_batch([_req(10)], FREE, T0)
    assert decision is not None
    # The same batch, the same rank and the same prediction as the async policy, at once and at any size.
    config = SchedulerConfig(max_batch_tokens=8192, max_batch_prompts=64)
    ranks = [RankView(True, 1, 30.0), RankView(True, 2, 5.0), RankView(False, 2, 0.0)]
    for pending in ([_req(10)], [_req(10, name="a"), _req(300, name="b")], [_req(5000)]):
        got = _policy(max_wait_ms=0.0).next_batch(pending, ranks, T0)
        want = AsyncBatchPolicy(config).next_batch(pending, ranks, T0)
        assert got is not None and want is not None
        assert (got.rank, got.requests, got.predicted_ms) == (want.rank, want.requests, want.predicted_ms)
        assert _policy(max_wait_ms=0.0).wake_at(pending, T0) is None


@pytest.mark.parametrize(
    ("min_tokens", "max_wait_ms", "slo_fraction"),
    [(0, 50.0, 0.1), (100, -1.0, 0.1), (100, 50.0, 0.0), (100, 50.0, 1.5)],
)
def test_bad_settings_are_rejected(min_tokens: int, max_wait_ms: float, slo_fraction: float) -> None:
    with pytest.raises(InvalidArgument):
        _policy(min_tokens, max_wait_ms, slo_fraction)


def test_an_idle_rank_takes_a_small_batch_at_once() -> None:
    """Light load is not delayed: with an idle rank, even a batch far below the threshold goes now."""
    policy = MinBatchPolicy(SchedulerConfig(), min_batch_tokens=4096, max_wait_ms=1000.0)
    request = ScheduledRequest("r", [1] * 10, arrival=100.0)
    idle = [RankView(healthy=True, free_slots=2, predicted_load_ms=0.0, idle=True)]
    decision = policy.next_batch([request], idle, now=100.0)
    assert decision is not None and decision.requests == [request]
    assert policy.next_batch([request], FREE, now=100.0) is None  # busy ranks only: it is held
