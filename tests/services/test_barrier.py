"""StepBarrier: an expert rank holds a sync step's layer until every attention rank's dispatch is in."""

from __future__ import annotations

import asyncio

import pytest

from asap.errors import InvalidArgument, Unavailable
from asap.syncstep import SyncStep
from expert_svc.barrier import StepBarrier


def arrive(
    barrier: StepBarrier,
    attention_rank: int,
    rows: int,
    total_rows: int,
    *,
    step: int = 1,
    layer: int = 0,
    participants: int = 2,
) -> asyncio.Task[int]:
    return asyncio.create_task(
        barrier.wait(
            sync=SyncStep(step, participants),
            layer=layer,
            attention_rank=attention_rank,
            rows=rows,
            total_rows=total_rows,
        )
    )


async def spin(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_releases_only_when_every_participants_rows_are_in() -> None:
    barrier = StepBarrier(timeout_s=5)
    # Rank 0's dispatch of 10 rows comes in three chunks, rank 1's of 4 rows in one.
    first = [arrive(barrier, 0, 3, 10), arrive(barrier, 0, 3, 10)]
    await spin()
    assert not any(t.done() for t in first)
    rank1 = arrive(barrier, 1, 4, 4)
    await spin()
    assert not rank1.done() and not any(t.done() for t in first), "rank 0 still owes 4 rows"
    assert barrier.open_groups == 1
    last = arrive(barrier, 0, 4, 10)
    waited = await asyncio.wait_for(asyncio.gather(*first, rank1, last), 1.0)
    assert all(w >= 0 for w in waited)
    assert barrier.open_groups == 0


async def test_an_empty_dispatch_counts_as_complete() -> None:
    barrier = StepBarrier(timeout_s=5)
    busy = arrive(barrier, 0, 6, 6, participants=3)
    idle = arrive(barrier, 1, 0, 0, participants=3)
    await spin()
    assert not busy.done() and not idle.done()
    also_idle = arrive(barrier, 2, 0, 0, participants=3)
    await asyncio.wait_for(asyncio.gather(busy, idle, also_idle), 1.0)
    assert barrier.open_groups == 0


async def test_an_all_empty_step_is_released_too() -> None:
    barrier = StepBarrier(timeout_s=5)
    first = arrive(barrier, 0, 0, 0)
    await spin()
    # An empty dispatch is complete at once, but the step still waits for the other participant.
    assert not first.done() and barrier.open_groups == 1
    waited = await asyncio.wait_for(asyncio.gather(first, arrive(barrier, 1, 0, 0)), 1.0)
    assert len(waited) == 2 and all(isinstance(ns, int) and ns >= 0 for ns in waited)
    assert barrier.open_groups == 0
    # The released step leaves nothing behind: the same (step, layer) opens a fresh group.
    again = arrive(barrier, 0, 0, 0)
    await spin()
    assert not again.done() and barrier.open_groups == 1
    again.cancel()


async def test_step_and_layer_keys_are_independent() -> None:
    barrier = StepBarrier(timeout_s=5)
    layer0 = arrive(barrier, 0, 2, 2, layer=0)
    layer1 = arrive(barrier, 0, 2, 2, layer=1)
    step2 = arrive(barrier, 0, 2, 2, step=2, layer=0)
    await spin()
    assert barrier.open_groups == 3
    # Completing (1, 1) releases it alone.
    await asyncio.wait_for(arrive(barrier, 1, 1, 1, layer=1), 1.0)
    await asyncio.wait_for(layer1, 1.0)
    await spin()
    assert not layer0.done() and not step2.done()
    await asyncio.wait_for(asyncio.gather(arrive(barrier, 1, 0, 0, step=2), step2), 1.0)
    assert not layer0.done()
    await asyncio.wait_for(asyncio.gather(arrive(barrier, 1, 5, 5), layer0), 1.0)
    assert barrier.open_groups == 0


async def test_a_step_id_can_be_used_again_once_released() -> None:
    barrier = StepBarrier(timeout_s=5)
    for _ in range(2):
        await asyncio.wait_for(asyncio.gather(arrive(barrier, 0, 1, 1), arrive(barrier, 1, 1, 1)), 1.0)
    assert barrier.open_groups == 0


async def test_mismatched_participant_count_is_invalid_argument() -> None:
    barrier = StepBarrier(timeout_s=5)
    first = arrive(barrier, 0, 1, 1, participants=2)
    await spin()
    with pytest.raises(InvalidArgument, match=r"step 1 layer 0.*3 participants.*said 2"):
        await arrive(barrier, 1, 1, 1, participants=3)
    assert not first.done()
    # The well-formed arrival still completes the step.
    await asyncio.wait_for(asyncio.gather(arrive(barrier, 1, 1, 1, participants=2), first), 1.0)


async def test_more_rows_from_a_complete_rank_is_invalid_argument() -> None:
    barrier = StepBarrier(timeout_s=5)
    first = arrive(barrier, 0, 2, 2)
    await spin()
    with pytest.raises(InvalidArgument, match="attention rank 0 sent more rows"):
        await arrive(barrier, 0, 1, 2)
    first.cancel()


async def test_a_missing_participant_times_out_with_unavailable_naming_the_step_and_layer() -> None:
    barrier = StepBarrier(timeout_s=0.1)
    waits = [
        arrive(barrier, 0, 3, 3, step=7, layer=2, participants=3),
        arrive(barrier, 1, 0, 0, step=7, layer=2, participants=3),
    ]
    for task in waits:
        with pytest.raises(Unavailable, match=r"sync step 7 layer 2: 1 attention rank\(s\) never sent"):
            await asyncio.wait_for(task, 2.0)
    assert barrier.open_groups == 0


async def test_wait_time_is_zero_for_the_last_arrival_and_positive_for_early_ones() -> None:
    barrier = StepBarrier(timeout_s=5)
    early = arrive(barrier, 0, 1, 1)
    await asyncio.sleep(0.05)
    last = await asyncio.wait_for(arrive(barrier, 1, 1, 1), 1.0)
    early_ns = await early
    assert last < 5_000_000  # the last arrival does not wait (5 ms: scheduling noise only)
    assert early_ns >= 40_000_000  # it waited for the other rank, about 50 ms
    assert early_ns > last


async def test_a_newer_step_fails_the_open_groups_of_older_ones_when_superseding() -> None:
    barrier = StepBarrier(timeout_s=60, supersede=True)
    held = [arrive(barrier, 0, 2, 2, layer=0), arrive(barrier, 0, 2, 2, layer=1)]
    await spin()
    assert not any(t.done() for t in held) and barrier.open_groups == 2
    # Step 2 begins (the scheduler gave step 1 up): step 1's groups fail at once, not after 60 s.
    newer = arrive(barrier, 1, 1, 1, step=2, participants=1)
    for task in held:
        with pytest.raises(Unavailable, match=r"step 1 .* given up"):
            await asyncio.wait_for(task, 1.0)
    assert await asyncio.wait_for(newer, 1.0) >= 0
    assert barrier.superseded == 2 and barrier.open_groups == 0


async def test_a_late_chunk_of_an_older_step_does_not_supersede_the_current_one() -> None:
    barrier = StepBarrier(timeout_s=60, supersede=True)
    current = arrive(barrier, 0, 1, 1, step=5)
    late = arrive(barrier, 1, 1, 1, step=4)  # a rank that was frozen wakes up with step 4's dispatch
    await spin()
    assert not current.done() and not late.done() and barrier.superseded == 0
    await asyncio.wait_for(arrive(barrier, 1, 1, 1, step=5), 1.0)
    assert await asyncio.wait_for(current, 1.0) >= 0
    # the next step ends the late group as well
    nxt = arrive(barrier, 0, 0, 0, step=6, participants=1)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(late, 1.0)
    await asyncio.wait_for(nxt, 1.0)
