"""SchedulerCore in the synchronous modes (``sync``, ``sync-chunked``) against a fake RankClient.

The fake records every call with its step arguments and, when holding, keeps each step's calls waiting
on one event per step, so the tests decide when a step ends (no timing involved, except deadlines).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from asap.errors import AsapError, DeadlineExceeded, Unavailable
from asap.syncstep import SyncStep
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import RankResultItem, ScheduledRequest, SchedulerCore
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.sync import SyncDispatcher


@dataclass
class StepCall:
    rank: int
    batch_id: int
    request_ids: list[str]
    step: int
    participants: int
    chunks: list[tuple[int, int]] | None
    drop: list[str]
    finished: bool = False
    cancelled: bool = False


@dataclass
class FakeStepClient:
    """A RankClient for the sync modes. With ``hold``, each call waits until ``release(step[, rank])``."""

    hold: bool = False
    calls: list[StepCall] = field(default_factory=list)
    down: set[int] = field(default_factory=set)
    gates: dict[tuple[int, int], asyncio.Event] = field(default_factory=dict)
    log: list[tuple[str, int, int]] = field(default_factory=list)
    """("start" | "end", step, rank) in the order they happened."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> list[RankResultItem | AsapError | None]:
        step, participants = SyncStep.to_wire(sync)
        call = StepCall(
            rank,
            batch_id,
            [r.request_id for r in requests],
            step,
            participants,
            None if chunks is None else list(chunks),
            list(drop),
        )
        self.calls.append(call)
        self.log.append(("start", step, rank))
        self.changed.set()
        try:
            if self.hold:
                await self.gates.setdefault((step, rank), asyncio.Event()).wait()
            if rank in self.down:
                raise Unavailable(f"rank {rank} stream closed")
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        call.finished = True
        self.log.append(("end", step, rank))
        spans = chunks if chunks is not None else [(0, r.prompt_tokens) for r in requests]
        return [
            None if end < r.prompt_tokens else _item(r, end - start)
            for r, (start, end) in zip(requests, spans, strict=True)
        ]

    def release(self, step: int, ranks: Sequence[int] = (0, 1, 2, 3)) -> None:
        for rank in ranks:
            self.gates.setdefault((step, rank), asyncio.Event()).set()

    async def wait_for_step(self, step: int, calls: int) -> list[StepCall]:
        """Wait until ``calls`` calls of ``step`` were made; returns them by rank."""
        async with asyncio.timeout(2.0):
            while len(of := self.of_step(step)) < calls:
                self.changed.clear()
                await self.changed.wait()
        return of

    def of_step(self, step: int) -> list[StepCall]:
        return sorted((c for c in self.calls if c.step == step), key=lambda c: c.rank)

    def steps(self) -> list[int]:
        return sorted({c.step for c in self.calls})


def _item(request: ScheduledRequest, sent_tokens: int) -> RankResultItem:
    """As an attention rank answers: it counts the tokens it was sent (the last chunk's only)."""
    n = request.prompt_tokens
    return RankResultItem(
        first_token_id=n % 251, first_token_logprob=-0.5, top_logprobs=[], prompt_tokens=sent_tokens
    )


def req(request_id: str, n: int = 10, **kwargs: Any) -> ScheduledRequest:
    return ScheduledRequest(request_id=request_id, token_ids=list(range(n)), **kwargs)


def make_core(client: FakeStepClient, num_ranks: int, mode: str, **config: Any) -> SchedulerCore:
    cost = AttentionCostModel(a_ms=0.01, b_ms=1e-5, c_ms=1.0)
    return SchedulerCore(SchedulerConfig(mode=mode, cost=cost, **config), num_ranks, client)


async def spin(rounds: int = 10) -> None:
    """Let ready tasks run (no timing involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.mark.parametrize("mode", ["sync", "sync-chunked"])
async def test_every_healthy_rank_runs_each_step_with_the_same_step_and_participants(mode: str) -> None:
    client = FakeStepClient()
    async with make_core(client, 3, mode, chunk_tokens=64) as core:
        result = await core.submit(req("only", 20))
        assert result.first_token_id == 20 and result.prompt_tokens == 20
        step = client.of_step(1)
        assert [c.rank for c in step] == [0, 1, 2]
        assert all(c.participants == 3 for c in step)
        assert sorted(len(c.request_ids) for c in step) == [0, 0, 1]  # idle ranks run empty batches
        assert len({c.batch_id for c in step}) == 3
        assert result.attention_rank == next(c.rank for c in step if c.request_ids)
        # whole prompts carry no chunk ranges in sync; sync-chunked sends them for every batch
        busy = next(c for c in step if c.request_ids)
        assert busy.chunks == (None if mode == "sync" else [(0, 20)])
        assert client.steps() == [1]  # nothing left: no more steps


async def test_steps_are_sequential_the_next_starts_only_after_every_rank_finished() -> None:
    client = FakeStepClient(hold=True)
    async with make_core(client, 2, "sync", max_batch_tokens=100) as core:
        first = [asyncio.create_task(core.submit(req(f"a{i}", 60))) for i in range(2)]
        step1 = await client.wait_for_step(1, 2)
        assert sorted(c.request_ids for c in step1) == [["a0"], ["a1"]]
        later = [asyncio.create_task(core.submit(req(f"b{i}", 30))) for i in range(3)]
        await spin()
        assert client.steps() == [1], "step 2 started while step 1 was running"
        # One rank of the step finishing is not enough either.
        client.release(1, ranks=[0])
        await spin()
        assert step1[0].finished and not step1[1].finished
        assert client.steps() == [1]
        client.release(1, ranks=[1])
        step2 = await client.wait_for_step(2, 2)
        assert sorted(rid for c in step2 for rid in c.request_ids) == ["b0", "b1", "b2"]
        assert {c.participants for c in step2} == {2}
        client.release(2)
        results = await asyncio.gather(*first, *later)
        assert [r.request_id for r in results] == ["a0", "a1", "b0", "b1", "b2"]
        # Every end of step s comes before any start of step s + 1.
        for s in (1, 2):
            last_end = max(i for i, (kind, step, _) in enumerate(client.log) if kind == "end" and step == s)
            first_next = min(
                (i for i, (kind, step, _) in enumerate(client.log) if kind == "start" and step == s + 1),
                default=len(client.log),
            )
            assert last_end < first_next
        assert client.steps() == [1, 2]


async def test_chunked_prompt_runs_in_contiguous_chunks_on_one_rank_and_answers_once() -> None:
    client = FakeStepClient()
    async with make_core(client, 2, "sync-chunked", chunk_tokens=16) as core:
        result = await core.submit(req("long", 40))
        assert result.prompt_tokens == 40 and result.first_token_id == 40
        assert client.steps() == [1, 2, 3]
        mine = [c for c in client.calls if c.request_ids == ["long"]]
        assert [c.chunks for c in mine] == [[(0, 16)], [(16, 32)], [(32, 40)]]
        assert {c.rank for c in mine} == {result.attention_rank}
        assert [c.step for c in mine] == [1, 2, 3]
        # the other rank took part in every step with an empty batch
        idle = [c for c in client.calls if c.rank != result.attention_rank]
        assert [(c.step, c.request_ids, c.participants) for c in idle] == [(s, [], 2) for s in (1, 2, 3)]
        assert core.state().completed == 1
        assert isinstance(core.dispatcher, SyncDispatcher) and core.dispatcher.in_progress == []


async def test_chunked_prompts_keep_their_rank_while_new_work_fills_the_rest() -> None:
    client = FakeStepClient()
    async with make_core(client, 2, "sync-chunked", chunk_tokens=16) as core:
        results = await asyncio.gather(
            core.submit(req("long", 50)), *(core.submit(req(f"s{i}", 8)) for i in range(4))
        )
        ranks = {r.request_id: r.attention_rank for r in results}
        per_request: dict[str, list[tuple[int, int]]] = {}
        for call in client.calls:
            assert call.chunks is not None
            assert sum(end - start for start, end in call.chunks) <= 16
            for rid, span in zip(call.request_ids, call.chunks, strict=True):
                per_request.setdefault(rid, []).append(span)
                assert call.rank == ranks[rid]
        for rid, spans in per_request.items():
            n = 50 if rid == "long" else 8
            assert spans[0][0] == 0 and spans[-1][1] == n, (rid, spans)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), (rid, spans)
        assert [r.prompt_tokens for r in results] == [50, 8, 8, 8, 8]


async def test_deadline_of_a_chunked_request_drops_its_cache_in_a_later_step() -> None:
    client = FakeStepClient(hold=True)
    async with make_core(client, 2, "sync-chunked", chunk_tokens=16) as core:
        loop = asyncio.get_running_loop()
        doomed = asyncio.create_task(core.submit(req("doomed", 100, deadline=loop.time() + 0.3)))
        (step1,) = [c for c in await client.wait_for_step(1, 2) if c.request_ids]
        client.release(1)
        await client.wait_for_step(2, 2)
        with pytest.raises(DeadlineExceeded):
            await doomed  # its deadline passes while step 2 holds its second chunk
        client.release(2)
        await spin()
        assert client.steps() == [1, 2]  # nothing else to do: no step runs only to carry the drop
        client.hold = False
        after = await core.submit(req("after", 5))
        assert after.prompt_tokens == 5
        step3 = client.of_step(3)
        assert step3[step1.rank].drop == ["doomed"]
        assert step3[1 - step1.rank].drop == []
        assert all("doomed" not in c.request_ids for c in step3)
        assert all("doomed" not in c.drop for c in client.calls if c.step != 3)  # sent once
        assert core.state().failed == 1


async def test_cancelled_chunked_request_is_dropped_and_gets_no_more_chunks() -> None:
    client = FakeStepClient(hold=True)
    async with make_core(client, 1, "sync-chunked", chunk_tokens=16) as core:
        gone = asyncio.create_task(core.submit(req("gone", 100)))
        stays = asyncio.create_task(core.submit(req("stays", 40)))
        await client.wait_for_step(1, 1)
        assert client.of_step(1)[0].request_ids == ["gone"]  # the head of the queue takes the budget
        client.release(1)
        await client.wait_for_step(2, 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        client.hold = False
        client.release(2)
        result = await stays
        assert result.prompt_tokens == 40
        later = [c for c in client.calls if c.step > 2]
        assert later[0].drop == ["gone"]
        assert all("gone" not in c.request_ids for c in later)
        assert [rid for c in client.calls for rid in c.drop] == ["gone"]
        assert core.state().cancelled == 1


async def test_unavailable_rank_is_marked_down_and_left_out_of_later_steps() -> None:
    client = FakeStepClient(down={1})
    async with make_core(client, 2, "sync") as core:
        outcomes = await asyncio.gather(
            core.submit(req("a", 10)), core.submit(req("b", 10)), return_exceptions=True
        )
        step1 = client.of_step(1)
        assert [(c.rank, c.participants) for c in step1] == [(0, 2), (1, 2)]
        on_down = step1[1].request_ids
        assert len(on_down) == 1
        for request_id, outcome in zip(("a", "b"), outcomes, strict=True):
            if request_id in on_down:
                assert isinstance(outcome, Unavailable)
            else:
                assert not isinstance(outcome, BaseException)
                assert outcome.attention_rank == 0
        state = core.state()
        assert not state.ranks[1].healthy and "stream closed" in state.ranks[1].down_reason
        assert state.ranks[0].healthy

        later = await asyncio.gather(*(core.submit(req(f"c{i}", 10)) for i in range(3)))
        assert {r.attention_rank for r in later} == {0}
        after = [c for c in client.calls if c.step > 1]
        assert after and all((c.rank, c.participants) == (0, 1) for c in after)

        core.mark_rank_up(1)
        client.down.clear()
        await core.submit(req("d", 10))
        assert [(c.rank, c.participants) for c in client.of_step(max(client.steps()))] == [(0, 2), (1, 2)]


async def test_rank_down_while_holding_chunks_fails_that_request_only() -> None:
    client = FakeStepClient(hold=True)
    async with make_core(client, 2, "sync-chunked", chunk_tokens=16) as core:
        long = asyncio.create_task(core.submit(req("long", 100)))
        short = asyncio.create_task(core.submit(req("short", 8)))
        step1 = await client.wait_for_step(1, 2)
        long_rank = next(c.rank for c in step1 if "long" in c.request_ids)
        client.release(1)
        await client.wait_for_step(2, 2)
        client.down.add(long_rank)
        client.hold = False
        client.release(2)
        with pytest.raises(Unavailable):
            await long
        assert (await short).attention_rank == 1 - long_rank
        assert not core.state().ranks[long_rank].healthy
        assert isinstance(core.dispatcher, SyncDispatcher) and core.dispatcher.in_progress == []


async def test_stop_fails_in_progress_chunked_requests_with_unavailable() -> None:
    client = FakeStepClient(hold=True)
    core = make_core(client, 2, "sync-chunked", chunk_tokens=16)
    await core.start()
    running = asyncio.create_task(core.submit(req("running", 100)))
    queued = asyncio.create_task(core.submit(req("queued", 100)))
    queued_late = [asyncio.create_task(core.submit(req(f"q{i}", 100))) for i in range(2)]
    step1 = await client.wait_for_step(1, 2)
    assert sorted(rid for c in step1 for rid in c.request_ids) == ["queued", "running"]
    client.release(1)
    await client.wait_for_step(2, 2)
    async with asyncio.timeout(2.0):
        await core.stop()
    for task in (running, queued, *queued_late):
        with pytest.raises(Unavailable, match="shutting down"):
            await task
    assert all(c.cancelled for c in client.of_step(2)), "the running step must be given up"
    assert isinstance(core.dispatcher, SyncDispatcher) and core.dispatcher.in_progress == []
    assert core._task is not None and core._task.done()
    await core.stop()  # idempotent


async def test_a_rank_taken_down_mid_step_ends_the_step_for_the_others_at_once() -> None:
    # Rank 1 freezes mid-step: rank 0 waits at the experts' barrier for it (held here). When the health
    # monitor takes rank 1 down, rank 0's requests fail with Unavailable at once and the next step runs
    # without rank 1, instead of the step holding until the barrier's timeout.
    client = FakeStepClient(hold=True)
    async with make_core(client, 2, "sync", max_batch_tokens=10) as core:
        first = [asyncio.create_task(core.submit(req(f"a{i}", 10))) for i in range(2)]
        step1 = await client.wait_for_step(1, 2)
        core.mark_rank_down(1, "health check failed")
        outcomes = await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), 2.0)
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        assert any("left the step" in o.message for o in outcomes if isinstance(o, Unavailable))
        assert step1[0].cancelled and step1[1].cancelled
        assert core.state().ranks[0].healthy, "the rank that was left waiting is not at fault"
        later = asyncio.create_task(core.submit(req("b", 10)))
        (step2,) = await client.wait_for_step(2, 1)
        assert (step2.rank, step2.participants) == (0, 1)
        client.release(2)
        assert (await asyncio.wait_for(later, 2.0)).attention_rank == 0


async def test_a_whole_batch_failing_on_one_rank_ends_the_step_for_the_others() -> None:
    from scheduler_svc.requests import FailedBatch

    class OneFails(FakeStepClient):
        async def run_batch(
            self, rank: int, *args: Any, **kwargs: Any
        ) -> list[RankResultItem | AsapError | None]:
            if rank == 1:
                await spin()
                return FailedBatch([Unavailable("expert rank 1 at x: stream ended")] * len(args[1]))
            return await super().run_batch(rank, *args, **kwargs)

    client = OneFails(hold=True)
    async with make_core(client, 2, "sync", max_batch_tokens=10) as core:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(core.submit(req(f"a{i}", 10)) for i in range(2)), return_exceptions=True), 2.0
        )
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        assert all(r.healthy for r in core.state().ranks), "a failed batch does not take a rank down"


async def test_per_rank_planner_balances_by_request_count_and_ranks_keep_their_own_queue() -> None:
    client = FakeStepClient(hold=True)
    async with make_core(client, 2, "sync", max_batch_tokens=100, sync_planner="per-rank") as core:
        first = [asyncio.create_task(core.submit(req(f"a{i}", n))) for i, n in enumerate((90, 10))]
        step1 = await client.wait_for_step(1, 2)
        # one request each: counts, not lengths, decide (the longest-first planner would do the same here)
        assert [c.request_ids for c in step1] == [["a0"], ["a1"]]
        later = [asyncio.create_task(core.submit(req(f"b{i}", 60))) for i in range(3)]
        await spin()
        client.release(1)
        step2 = await client.wait_for_step(2, 2)
        # b0 -> rank 0, b1 -> rank 1, b2 -> rank 0 (ties go to the lowest rank): rank 0's two do not fit
        # its 100-token budget together, so b2 waits for step 3 on rank 0 although rank 1 could take it
        assert [c.request_ids for c in step2] == [["b0"], ["b1"]]
        client.release(2)
        step3 = await client.wait_for_step(3, 2)
        assert [c.request_ids for c in step3] == [["b2"], []]
        client.release(3)
        results = await asyncio.gather(*first, *later)
        assert [r.attention_rank for r in results] == [0, 1, 0, 1, 0]


def test_an_unknown_sync_planner_is_rejected() -> None:
    with pytest.raises(AsapError):
        SchedulerConfig(sync_planner="best")
