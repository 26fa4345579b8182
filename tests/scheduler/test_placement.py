"""Placement by predicted finish time: the rank choice rule, async batch placement, sync LPT packing."""

from __future__ import annotations

import pytest

from asap.errors import InvalidArgument, Unavailable
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.placement import (
    RankView,
    balance_request,
    least_finish_time,
    least_loaded,
    place_batch,
    place_longest_first,
)
from scheduler_svc.requests import ScheduledRequest

COST = AttentionCostModel(a_ms=1.0, b_ms=0.0, c_ms=10.0)


def _req(name: str, tokens: int) -> ScheduledRequest:
    return ScheduledRequest(request_id=name, token_ids=[1] * tokens)


def test_least_finish_time_skips_unhealthy_ranks() -> None:
    assert least_finish_time([5.0, 1.0, 3.0], [True, True, True]) == 1
    assert least_finish_time([5.0, 1.0, 3.0], [True, False, True]) == 2
    assert least_finish_time([2.0, 2.0], [True, True]) == 0  # ties: the lowest index


def test_least_finish_time_without_healthy_rank_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        least_finish_time([1.0, 2.0], [False, False])
    with pytest.raises(InvalidArgument):
        least_finish_time([1.0], [True, True])


def test_least_loaded_takes_rank_ids_not_positions() -> None:
    assert least_loaded([3, 1], {1: 4.0, 3: 2.0}) == 3
    assert least_loaded([3, 1], {1: 2.0, 3: 2.0}) == 1  # ties: the lowest rank


def test_place_batch_adds_the_batch_cost_to_each_free_ranks_load() -> None:
    config = SchedulerConfig(cost=COST)
    busy = RankView(healthy=True, free_slots=1, predicted_load_ms=30.0, idle=False)
    light = RankView(healthy=True, free_slots=1, predicted_load_ms=5.0, idle=False)
    full = RankView(healthy=True, free_slots=0, predicted_load_ms=0.0, idle=False)
    decision = place_batch(config, [_req("a", 20)], [busy, full, light])
    assert decision is not None
    assert (decision.rank, decision.predicted_ms) == (2, 30.0)
    assert place_batch(config, [], [light]) is None
    assert place_batch(config, [_req("a", 20)], [full]) is None


def test_longest_first_balances_predicted_load_and_updates_the_tables() -> None:
    prompts, used, load = {0: 0, 1: 0}, {0: 0, 1: 0}, {0: 0.0, 1: 0.0}
    candidates = [_req("short", 10), _req("long", 50), _req("mid", 30)]
    placed, left_out = place_longest_first(
        candidates, prompts, used, load, budget=100, max_batch_prompts=4, chunk_tokens=None, cost=COST
    )
    assert left_out == []
    assert [(p.request.request_id, p.rank, p.tokens) for p in placed] == [
        ("long", 0, 50),
        ("mid", 1, 30),
        ("short", 1, 10),
    ]
    assert prompts == {0: 1, 1: 2} and used == {0: 50, 1: 40} and load == {0: 50.0, 1: 40.0}


def test_longest_first_leaves_out_what_fits_nowhere_unless_it_may_be_chunked() -> None:
    whole = place_longest_first(
        [_req("big", 80)], {0: 1}, {0: 30}, {0: 30.0}, budget=100, max_batch_prompts=4,
        chunk_tokens=None, cost=COST,
    )  # fmt: skip
    assert whole[0] == [] and [r.request_id for r in whole[1]] == ["big"]
    chunked, left_out = place_longest_first(
        [_req("big", 80)], {0: 1}, {0: 30}, {0: 30.0}, budget=100, max_batch_prompts=4,
        chunk_tokens=100, cost=COST,
    )  # fmt: skip
    assert left_out == [] and [(p.rank, p.tokens) for p in chunked] == [(0, 70)]


def test_longest_first_respects_the_prompt_bound() -> None:
    placed, left_out = place_longest_first(
        [_req("a", 1), _req("b", 1)], {0: 0}, {0: 0}, {0: 0.0}, budget=100, max_batch_prompts=1,
        chunk_tokens=None, cost=COST,
    )  # fmt: skip
    assert len(placed) == 1 and len(left_out) == 1


def test_balance_request_weighs_waiting_four_times_running_lowest_rank_on_ties() -> None:
    # vLLM's DP balancer: score = 4 x waiting + running
    assert balance_request({0: 1, 1: 0}, {0: 0, 1: 3}) == 1  # 4 > 3
    assert balance_request({0: 1, 1: 0}, {0: 0, 1: 5}) == 0  # 4 < 5
    assert balance_request({0: 0, 1: 0, 2: 0}, {0: 1, 1: 0, 2: 0}) == 1
    with pytest.raises(Unavailable):
        balance_request({}, {})
