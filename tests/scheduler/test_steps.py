"""plan_step: one global step of the synchronous baselines (whole prompts, and chunked prefill)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.requests import ScheduledRequest
from scheduler_svc.steps import ChunkItem, InProgress, StepPlan, plan_step, plan_step_per_rank

COST = AttentionCostModel(a_ms=0.02, b_ms=4e-6, c_ms=2.0)


def req(request_id: str, n: int) -> ScheduledRequest:
    return ScheduledRequest(request_id=request_id, token_ids=[1] * n)


def reqs(lengths: Sequence[int]) -> list[ScheduledRequest]:
    return [req(f"r{i}", n) for i, n in enumerate(lengths)]


def plan(
    pending: Sequence[ScheduledRequest],
    ranks: Sequence[int] = (0, 1),
    *,
    in_progress: Sequence[InProgress] = (),
    max_batch_tokens: int = 100,
    max_batch_prompts: int = 64,
    chunk_tokens: int | None = None,
) -> StepPlan:
    return plan_step(
        pending,
        in_progress,
        ranks,
        max_batch_tokens=max_batch_tokens,
        max_batch_prompts=max_batch_prompts,
        cost=COST,
        chunk_tokens=chunk_tokens,
    )


def ids(items: Sequence[ChunkItem]) -> list[str]:
    return [item.request.request_id for item in items]


def spans(items: Sequence[ChunkItem]) -> list[tuple[str, int, int]]:
    return [(item.request.request_id, item.start, item.end) for item in items]


def rank_tokens(p: StepPlan) -> dict[int, int]:
    return {rank: sum(item.tokens for item in items) for rank, items in p.batches.items()}


def rank_cost(p: StepPlan) -> dict[int, float]:
    return {rank: sum(COST.prompt_ms(item.tokens) for item in items) for rank, items in p.batches.items()}


# --- both modes ---------------------------------------------------------------------------------------------


def test_no_healthy_ranks_gives_an_empty_plan() -> None:
    p = plan(reqs([10, 20]), ranks=())
    assert p.batches == {}
    assert p.started == []
    assert p.empty


def test_every_healthy_rank_is_in_the_plan_idle_ones_with_empty_lists() -> None:
    for chunk_tokens in (None, 50):
        p = plan(reqs([10]), ranks=(0, 2, 5), chunk_tokens=chunk_tokens)
        assert sorted(p.batches) == [0, 2, 5]
        assert sorted(len(items) for items in p.batches.values()) == [0, 0, 1]
        assert not p.empty
        idle = plan([], ranks=(0, 2, 5), chunk_tokens=chunk_tokens)
        assert idle.batches == {0: [], 2: [], 5: []}
        assert idle.empty


def test_prompts_per_rank_are_capped() -> None:
    for chunk_tokens in (None, 1000):
        p = plan(reqs([1] * 10), max_batch_tokens=1000, max_batch_prompts=3, chunk_tokens=chunk_tokens)
        assert [len(p.batches[r]) for r in (0, 1)] == [3, 3]
        assert [r.request_id for r in p.started] == [f"r{i}" for i in range(6)]  # FIFO prefix


# --- sync: whole prompts ------------------------------------------------------------------------------------


def test_sync_runs_whole_prompts_within_the_per_rank_budget() -> None:
    p = plan(reqs([30, 45, 20, 60, 10, 25, 40]), max_batch_tokens=100)
    for items in p.batches.values():
        assert all(item.start == 0 and item.final for item in items)
        assert sum(item.tokens for item in items) <= 100
    placed = [r.request_id for r in p.started]
    assert sorted(placed) == sorted(i for items in p.batches.values() for i in ids(items))
    assert len(placed) >= 4


def test_sync_a_single_over_budget_prompt_runs_alone() -> None:
    p = plan(reqs([250, 5, 6]), max_batch_tokens=100)
    long_rank = next(r for r, items in p.batches.items() if "r0" in ids(items))
    assert spans(p.batches[long_rank]) == [("r0", 0, 250)]
    other = 1 - long_rank
    assert sorted(ids(p.batches[other])) == ["r1", "r2"]
    assert rank_tokens(p)[other] <= 100


def test_sync_two_over_budget_prompts_each_get_a_rank_of_their_own() -> None:
    p = plan(reqs([300, 200, 5]), max_batch_tokens=100)
    assert sorted(ids(items) for items in p.batches.values()) == [["r0"], ["r1"]]
    assert [r.request_id for r in p.started] == ["r0", "r1"]


def test_sync_started_is_a_fifo_prefix_no_skipping_ahead() -> None:
    # Room for 200 tokens in all; r3 does not fit after r0..r2 (175 tokens), and r4 (5 tokens) must not
    # jump ahead of it even though it would fit.
    p = plan(reqs([60, 60, 55, 50, 5]), max_batch_tokens=100)
    started = [r.request_id for r in p.started]
    assert started == ["r0", "r1", "r2"][: len(started)]
    assert "r4" not in started


def test_sync_a_request_left_out_by_packing_holds_back_the_ones_behind_it() -> None:
    # Total room (200) fits the first four (195), but two 60s and a 45 cannot share two ranks of 100:
    # the 45 is left for the next step, and so must be the 30 behind it.
    p = plan(reqs([60, 60, 45, 30]), max_batch_tokens=100)
    started = [r.request_id for r in p.started]
    assert started == ["r0", "r1", "r2", "r3"][: len(started)], started
    placed = sorted(i for items in p.batches.values() for i in ids(items))
    assert placed == sorted(started)


def test_sync_lpt_balances_predicted_cost_better_than_round_robin() -> None:
    lengths = [900, 100, 100, 100, 800, 100, 100, 700, 100, 100, 100, 100]
    ranks = (0, 1, 2)
    p = plan(reqs(lengths), ranks=ranks, max_batch_tokens=4096)
    assert len(p.started) == len(lengths)
    lpt_max = max(rank_cost(p).values())
    round_robin = [0.0] * len(ranks)
    for i, n in enumerate(lengths):
        round_robin[i % len(ranks)] += COST.prompt_ms(n)
    assert lpt_max < max(round_robin)
    # Each long prompt on a rank of its own; the short ones fill up the rest.
    assert sorted(max(item.tokens for item in items) for items in p.batches.values()) == [700, 800, 900]
    # LPT is within 4/3 of a lower bound of the optimum.
    total = sum(COST.prompt_ms(n) for n in lengths)
    assert lpt_max <= 4 / 3 * max(total / len(ranks), COST.prompt_ms(max(lengths)))


# --- sync-chunked -------------------------------------------------------------------------------------------


def test_chunked_never_exceeds_chunk_tokens_per_rank() -> None:
    p = plan(reqs([30, 45, 20, 60, 10]), chunk_tokens=40, max_batch_tokens=10_000)
    assert all(tokens <= 40 for tokens in rank_tokens(p).values())
    assert sum(rank_tokens(p).values()) == 80  # every rank full: there was more than enough work


def test_chunked_long_prompt_is_split_and_resumes_at_done() -> None:
    long = req("long", 100)
    first = plan([long], ranks=(0,), chunk_tokens=32)
    assert spans(first.batches[0]) == [("long", 0, 32)]
    assert not first.batches[0][0].final
    assert first.started == [long]

    done, covered = 32, [(0, 32)]
    while done < 100:
        step = plan([], ranks=(0,), in_progress=[InProgress(long, 0, done)], chunk_tokens=32)
        ((request_id, start, end),) = spans(step.batches[0])
        assert (request_id, start) == ("long", done)
        assert end == min(done + 32, 100)
        assert step.started == []
        covered.append((start, end))
        done = end
    assert covered == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert step.batches[0][0].final


def test_chunked_in_progress_continues_first_on_its_own_rank() -> None:
    long = req("long", 100)
    new = reqs([10, 10, 10])
    p = plan(new, ranks=(0, 1), in_progress=[InProgress(long, 1, 40)], chunk_tokens=32)
    assert spans(p.batches[1])[0] == ("long", 40, 72)
    assert rank_tokens(p) == {0: 30, 1: 32}  # rank 1's budget went to the in-progress prompt
    assert long not in p.started


def test_chunked_in_progress_on_a_rank_that_is_gone_is_not_planned() -> None:
    long = req("long", 100)
    p = plan([], ranks=(0,), in_progress=[InProgress(long, 1, 40)], chunk_tokens=32)
    assert p.batches == {0: []}
    assert p.empty


def test_chunked_fills_what_is_left_of_a_rank_with_a_first_chunk() -> None:
    long = req("long", 100)
    p = plan([req("new", 50)], ranks=(0,), in_progress=[InProgress(long, 0, 90)], chunk_tokens=32)
    assert spans(p.batches[0]) == [("long", 90, 100), ("new", 0, 22)]


def test_chunked_fills_the_step_budget_splitting_the_last_prompt_that_fits_in_part() -> None:
    p = plan(reqs([30, 45, 20, 60]), chunk_tokens=40, max_batch_tokens=10_000)
    assert rank_tokens(p) == {0: 40, 1: 40}
    assert [r.request_id for r in p.started] == ["r0", "r1", "r2"]


def test_chunked_the_head_of_the_queue_is_never_crowded_out_by_a_longer_one_behind_it() -> None:
    # LPT places the 2-token prompt first and fills the rank; the head (1 token) must still go first.
    p = plan(reqs([1, 2]), ranks=(0,), chunk_tokens=2, max_batch_prompts=2)
    assert [r.request_id for r in p.started] == ["r0"]
    assert spans(p.batches[0]) == [("r0", 0, 1)]


@settings(max_examples=300, deadline=None, database=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=12),
    num_ranks=st.integers(1, 4),
    chunk_tokens=st.integers(1, 64),
    max_batch_prompts=st.integers(1, 5),
)
def test_chunked_invariants_over_whole_runs(
    lengths: list[int], num_ranks: int, chunk_tokens: int, max_batch_prompts: int
) -> None:
    """Step after step until all is done, as the dispatcher does: every prompt is covered exactly once by
    contiguous chunks on one rank, no rank exceeds the chunk budget, the queue is served FIFO."""
    pending = reqs(lengths)
    ranks = list(range(num_ranks))
    in_progress: list[InProgress] = []
    covered: dict[str, list[tuple[int, int]]] = {r.request_id: [] for r in pending}
    rank_of: dict[str, int] = {}
    started_order: list[str] = []
    for _ in range(sum(lengths) + len(lengths)):
        if not pending and not in_progress:
            break
        p = plan(
            pending,
            ranks,
            in_progress=in_progress,
            chunk_tokens=chunk_tokens,
            max_batch_tokens=10_000,
            max_batch_prompts=max_batch_prompts,
        )
        assert sorted(p.batches) == ranks
        assert not p.empty, "work left but nothing planned"
        # FIFO: the started requests are the head of the queue, in order.
        assert p.started == pending[: len(p.started)]
        started_order += [r.request_id for r in p.started]
        pending = pending[len(p.started) :]
        continuing = {item.request.request_id: item for item in in_progress}
        next_progress: list[InProgress] = []
        for rank, items in p.batches.items():
            assert sum(item.tokens for item in items) <= chunk_tokens
            assert len(items) <= max_batch_prompts
            for item in items:
                rid = item.request.request_id
                assert 0 <= item.start < item.end <= item.request.prompt_tokens
                if rid in continuing:
                    assert rank == continuing[rid].rank, "a chunked prompt moved to another rank"
                    assert item.start == continuing[rid].done
                else:
                    assert item.start == 0
                    rank_of[rid] = rank
                covered[rid].append((item.start, item.end))
                if not item.final:
                    next_progress.append(InProgress(item.request, rank, item.end))
        # The in-progress prompts that got no budget this step keep waiting on their rank.
        planned = {item.request.request_id for items in p.batches.values() for item in items}
        next_progress += [item for item in in_progress if item.request.request_id not in planned]
        in_progress = next_progress
    assert not pending and not in_progress
    assert started_order == [f"r{i}" for i in range(len(lengths))]
    for request_id, ranges in covered.items():
        n = lengths[int(request_id[1:])]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges


def per_rank(
    queues: dict[int, Sequence[ScheduledRequest]],
    ranks: Sequence[int] = (0, 1),
    *,
    in_progress: Sequence[InProgress] = (),
    max_batch_tokens: int = 100,
    max_batch_prompts: int = 64,
    chunk_tokens: int | None = None,
) -> StepPlan:
    return plan_step_per_rank(
        queues,
        in_progress,
        ranks,
        max_batch_tokens=max_batch_tokens,
        max_batch_prompts=max_batch_prompts,
        chunk_tokens=chunk_tokens,
    )


def test_per_rank_each_rank_takes_its_own_fifo_prefix_and_never_another_ranks_work() -> None:
    a = reqs([60, 30, 30, 5])
    # rank 0 has four queued, rank 1 none: rank 1 stays empty (no work stealing), rank 0 stops at the
    # first prompt that does not fit (60 + 30 fits, the second 30 does not; the 5 behind it waits too)
    p = per_rank({0: a, 1: []})
    assert ids(p.batches[0]) == ["r0", "r1"] and p.batches[1] == []
    assert [r.request_id for r in p.started] == ["r0", "r1"]


def test_per_rank_a_prompt_over_the_budget_runs_alone_on_an_empty_rank() -> None:
    a, b = reqs([150, 10]), [req("x", 20), req("y", 200)]
    p = per_rank({0: a, 1: b})
    assert ids(p.batches[0]) == ["r0"]  # alone; the 10 behind it waits for the next step
    assert ids(p.batches[1]) == ["x"]  # 200 does not fit after 20 and is not split in sync
    assert rank_tokens(p) == {0: 150, 1: 20}


def test_per_rank_chunked_splits_the_last_prompt_and_continues_in_progress_first() -> None:
    held = req("held", 50)
    p = per_rank(
        {0: reqs([30, 40]), 1: [req("y", 10)]},
        in_progress=[InProgress(held, 0, 20)],
        chunk_tokens=40,
    )
    assert spans(p.batches[0]) == [("held", 20, 50), ("r0", 0, 10)]
    assert spans(p.batches[1]) == [("y", 0, 10)]
    assert [r.request_id for r in p.started] == ["r0", "y"]


def test_per_rank_respects_the_prompt_cap_and_healthy_ranks_only() -> None:
    p = per_rank({0: reqs([1, 1, 1]), 2: [req("down", 5)]}, ranks=(0, 1), max_batch_prompts=2)
    assert ids(p.batches[0]) == ["r0", "r1"] and p.batches[1] == [] and 2 not in p.batches
