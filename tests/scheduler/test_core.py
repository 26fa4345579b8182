"""SchedulerCore against a fake RankClient: batching, placement, admission, deadlines, failures, lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from asap.errors import AsapError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import RankResultItem, ScheduledRequest, SchedulerCore
from scheduler_svc.costmodel import AttentionCostModel


@dataclass
class Call:
    rank: int
    batch_id: int
    request_ids: list[str]


@dataclass
class FakeRankClient:
    """Records every batch; with ``hold`` each batch waits until released (or cancelled)."""

    hold: bool = False
    calls: list[Call] = field(default_factory=list)
    errors: dict[str, AsapError] = field(default_factory=dict)
    down: set[int] = field(default_factory=set)
    cancelled: list[int] = field(default_factory=list)
    sent: asyncio.Queue[Call] = field(default_factory=asyncio.Queue)
    gates: dict[int, asyncio.Event] = field(default_factory=dict)

    async def run_batch(
        self, rank: int, batch_id: int, requests: Sequence[ScheduledRequest]
    ) -> list[RankResultItem | AsapError]:
        call = Call(rank, batch_id, [r.request_id for r in requests])
        self.calls.append(call)
        self.sent.put_nowait(call)
        if rank in self.down:
            raise Unavailable(f"rank {rank} stream closed")
        if self.hold:
            gate = self.gates.setdefault(batch_id, asyncio.Event())
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(batch_id)
                raise
        return [self.errors.get(r.request_id) or _item(r) for r in requests]

    async def next_call(self) -> Call:
        return await asyncio.wait_for(self.sent.get(), timeout=2.0)

    def release(self, batch_id: int) -> None:
        self.gates.setdefault(batch_id, asyncio.Event()).set()

    def release_all(self) -> None:
        self.hold = False
        for gate in self.gates.values():
            gate.set()

    def sent_ids(self) -> set[str]:
        return {rid for call in self.calls for rid in call.request_ids}


def _item(request: ScheduledRequest) -> RankResultItem:
    n = len(request.token_ids)
    return RankResultItem(
        first_token_id=n % 997, first_token_logprob=-0.25, top_logprobs=[(n % 997, -0.25)], prompt_tokens=n
    )


def req(request_id: str, n: int = 10, **kwargs: Any) -> ScheduledRequest:
    return ScheduledRequest(request_id=request_id, token_ids=list(range(n)), **kwargs)


def make_core(client: FakeRankClient, num_ranks: int = 1, **config: Any) -> SchedulerCore:
    return SchedulerCore(SchedulerConfig(**config), num_ranks, client)


async def spin(rounds: int = 5) -> None:
    """Let ready tasks run (no timing involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def start_blocker(
    core: SchedulerCore, client: FakeRankClient, n: int = 10
) -> tuple[asyncio.Task[Any], Call]:
    """Occupy the only in-flight slot of rank 0 so later submissions wait in the queue."""
    task = asyncio.create_task(core.submit(req("blocker", n)))
    return task, await client.next_call()


async def test_results_come_back_per_request() -> None:
    client = FakeRankClient()
    async with make_core(client, num_ranks=2) as core:
        lengths = [5, 17, 300, 42, 8]
        results = await asyncio.gather(*(core.submit(req(f"r{i}", n)) for i, n in enumerate(lengths)))
        for i, (n, result) in enumerate(zip(lengths, results, strict=True)):
            assert result.request_id == f"r{i}"
            assert result.prompt_tokens == n
            assert result.first_token_id == n % 997
            assert result.top_logprobs == [(n % 997, -0.25)]
            assert result.attention_rank in (0, 1)
            assert 0.0 <= result.queue_ms <= result.ttft_ms
        state = core.state()
        assert (state.completed, state.failed, state.pending_requests) == (5, 0, 0)
        assert all(rank.running_batches == 0 for rank in state.ranks)


@pytest.mark.parametrize(("length", "per_batch"), [(40, 2), (10, 3)])
async def test_batches_respect_token_and_prompt_bounds(length: int, per_batch: int) -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_batch_tokens=100, max_batch_prompts=3, max_inflight_per_rank=1) as core:
        blocker, first = await start_blocker(core, client)
        tasks = [asyncio.create_task(core.submit(req(f"r{i}", length))) for i in range(7)]
        await spin()
        assert core.state().pending_requests == 7
        client.release_all()
        await asyncio.gather(blocker, *tasks)
    ids = [f"r{i}" for i in range(7)]
    expected = [ids[i : i + per_batch] for i in range(0, 7, per_batch)]
    assert [call.request_ids for call in client.calls] == [first.request_ids, *expected]


async def test_prompt_longer_than_the_batch_bound_runs_alone() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_batch_tokens=100, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        tasks = [
            asyncio.create_task(core.submit(req(rid, n)))
            for rid, n in [("a", 10), ("long", 500), ("b", 10), ("c", 10)]
        ]
        await spin()
        client.release_all()
        results = await asyncio.gather(blocker, *tasks)
    assert [call.request_ids for call in client.calls[1:]] == [["a"], ["long"], ["b", "c"]]
    assert results[2].prompt_tokens == 500


async def test_batches_go_to_the_rank_with_least_predicted_finish_time() -> None:
    client = FakeRankClient(hold=True)
    cost = AttentionCostModel(a_ms=0.01, b_ms=1e-4, c_ms=1.0)
    async with make_core(client, num_ranks=2, cost=cost, max_inflight_per_rank=2) as core:
        tasks = [asyncio.create_task(core.submit(req("long", 4000)))]
        assert (await client.next_call()).rank == 0  # idle cluster: the lowest rank
        placements = []
        for i in range(3):
            tasks.append(asyncio.create_task(core.submit(req(f"s{i}", 20))))
            placements.append((await client.next_call()).rank)
        # s0 and s1 go to rank 1 although each rank runs one batch when s1 arrives (count balancing
        # would pick rank 0); s2 goes to rank 0 only because rank 1 has no free slot left.
        assert placements == [1, 1, 0]
        state = core.state()
        assert state.ranks[0].predicted_load_ms > state.ranks[1].predicted_load_ms > 0
        assert [r.running_batches for r in state.ranks] == [2, 2]
        assert state.ranks[0].running_tokens == 4020
        client.release_all()
        await asyncio.gather(*tasks)
        assert all(r.predicted_load_ms == 0 for r in core.state().ranks)


async def test_admission_bound_raises_resource_exhausted_and_keeps_serving() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_queue_requests=2, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        queued = [asyncio.create_task(core.submit(req(f"q{i}"))) for i in range(2)]
        await spin()
        with pytest.raises(AsapError) as refused:
            await core.submit(req("over"))
        assert type(refused.value) is ResourceExhausted
        client.release_all()
        await asyncio.gather(blocker, *queued)
        assert (await core.submit(req("after"))).request_id == "after"
        assert "over" not in client.sent_ids()
        assert core.state().completed == 4


async def test_deadline_while_queued_never_reaches_a_rank() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded):
            await core.submit(req("late", deadline=loop.time() + 0.05))
        assert core.state().pending_requests == 0
        client.release_all()
        await blocker
        assert (await core.submit(req("next"))).request_id == "next"
        assert "late" not in client.sent_ids()
        assert (core.state().failed, core.state().completed) == (1, 2)


async def test_request_expiring_as_a_slot_frees_is_not_sent() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        late = asyncio.create_task(
            core.submit(req("late", deadline=asyncio.get_running_loop().time() + 0.01))
        )
        await spin()
        # Block the loop past the deadline, so the expiry and the freed slot are handled in the same turn.
        time.sleep(0.03)  # noqa: ASYNC251
        client.release_all()
        with pytest.raises(DeadlineExceeded):
            await late
        await blocker
        assert "late" not in client.sent_ids()


async def test_deadline_while_running_drops_the_result() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client) as core:
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded):
            await core.submit(req("slow", deadline=loop.time() + 0.05))
        assert client.sent_ids() == {"slow"}
        client.release_all()
        await spin()
        assert (core.state().completed, core.state().failed) == (0, 1)


async def test_expired_deadline_is_refused_at_once() -> None:
    async with make_core(FakeRankClient()) as core:
        with pytest.raises(DeadlineExceeded):
            await core.submit(req("old", deadline=asyncio.get_running_loop().time() - 1.0))


async def test_cancelled_submit_leaves_the_queue_and_is_never_sent() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        waiting = asyncio.create_task(core.submit(req("gone")))
        await spin()
        assert core.state().pending_requests == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert core.state().pending_requests == 0
        client.release_all()
        await blocker
        await spin()
        state = core.state()
        assert "gone" not in client.sent_ids()
        assert (state.pending_requests, state.ranks[0].running_batches, state.ranks[0].queued_requests) == (
            0,
            0,
            0,
        )
        assert (state.cancelled, state.completed) == (1, 1)


async def test_rank_down_fails_its_batches_and_takes_no_placements_until_up() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, num_ranks=2) as core:
        on_rank0 = asyncio.create_task(core.submit(req("a")))
        assert (await client.next_call()).rank == 0
        on_rank1 = asyncio.create_task(core.submit(req("b")))
        assert (await client.next_call()).rank == 1
        core.mark_rank_down(0, "stream closed")
        with pytest.raises(Unavailable, match="rank 0"):
            await on_rank0
        await spin()
        assert client.cancelled == [1]  # the rank's batch was given up, not left running
        assert not on_rank1.done()
        state = core.state()
        assert not state.ranks[0].healthy and state.ranks[0].down_reason == "stream closed"
        assert state.ranks[0].running_batches == 0
        more = [asyncio.create_task(core.submit(req(f"m{i}"))) for i in range(3)]
        batch = await client.next_call()  # rank 1 has one free slot: one batch of all three
        assert (batch.rank, batch.request_ids) == (1, ["m0", "m1", "m2"])
        core.mark_rank_up(0)
        again = asyncio.create_task(core.submit(req("again")))
        assert (await client.next_call()).rank == 0
        client.release_all()
        await asyncio.gather(on_rank1, again, *more)
        assert len(client.calls) == 4


async def test_unavailable_from_the_client_marks_the_rank_down() -> None:
    client = FakeRankClient(down={0})
    async with make_core(client, num_ranks=2) as core:
        with pytest.raises(Unavailable, match="stream closed"):
            await core.submit(req("first"))
        assert not core.state().ranks[0].healthy
        assert (await core.submit(req("second"))).attention_rank == 1


async def test_no_healthy_rank_fails_pending_and_new_requests() -> None:
    client = FakeRankClient(hold=True)
    async with make_core(client, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        queued = asyncio.create_task(core.submit(req("queued")))
        await spin()
        core.mark_rank_down(0, "gone")
        for task in (blocker, queued):
            with pytest.raises(Unavailable):
                await task
        with pytest.raises(Unavailable, match="no healthy"):
            await core.submit(req("new"))
        assert client.sent_ids() == {"blocker"}


async def test_per_request_error_fails_only_that_request() -> None:
    client = FakeRankClient(
        hold=True, errors={"bad": InvalidArgument("token id 99999 outside the vocabulary")}
    )
    async with make_core(client, max_inflight_per_rank=1) as core:
        blocker, _ = await start_blocker(core, client)
        tasks = [asyncio.create_task(core.submit(req(rid))) for rid in ("ok1", "bad", "ok2")]
        await spin()
        client.release_all()
        outcomes = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert client.calls[1].request_ids == ["ok1", "bad", "ok2"]  # one batch
    assert isinstance(outcomes[2], InvalidArgument)
    assert [o.request_id for o in (outcomes[1], outcomes[3])] == ["ok1", "ok2"]  # type: ignore[union-attr]
    assert (core.state().completed, core.state().failed) == (3, 1)


async def test_stop_fails_queued_requests_and_leaves_no_tasks() -> None:
    client = FakeRankClient(hold=True)
    core = make_core(client, max_inflight_per_rank=1)
    await core.start()
    blocker, _ = await start_blocker(core, client)
    queued = [asyncio.create_task(core.submit(req(f"q{i}"))) for i in range(2)]
    await spin()
    await core.stop()
    outcomes = await asyncio.gather(blocker, *queued, return_exceptions=True)
    assert all(type(o) is Unavailable for o in outcomes)
    assert client.cancelled == [1]
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await core.stop()  # idempotent
    with pytest.raises(Unavailable):
        await core.submit(req("late"))


async def test_stop_with_drain_lets_queued_work_finish() -> None:
    client = FakeRankClient(hold=True)
    core = make_core(client, max_inflight_per_rank=1)
    await core.start()
    blocker, _ = await start_blocker(core, client)
    queued = asyncio.create_task(core.submit(req("queued")))
    await spin()
    stopping = asyncio.create_task(core.stop(drain_timeout_s=5.0))
    await spin()
    with pytest.raises(Unavailable):
        await core.submit(req("refused"))
    client.release_all()
    await stopping
    assert [r.request_id for r in await asyncio.gather(blocker, queued)] == ["blocker", "queued"]


async def test_submit_validates_its_request() -> None:
    async with make_core(FakeRankClient()) as core:
        with pytest.raises(InvalidArgument, match="empty prompt"):
            await core.submit(req("empty", 0))
        request = req("twice")
        await core.submit(request)
        with pytest.raises(InvalidArgument, match="already submitted"):
            await core.submit(request)
        with pytest.raises(InvalidArgument):
            core.mark_rank_down(5, "no such rank")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"max_inflight_per_rank": 0}, "max_inflight_per_rank"),
        ({"mode": "lockstep"}, "lockstep"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        SchedulerConfig(**kwargs)
