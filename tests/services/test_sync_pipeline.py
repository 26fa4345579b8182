"""The synchronous baselines as real processes: same outputs as async, and the barrier in the timestamps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from asap.client import AsapClient, PrefillResult
from asap.model.reference import load_model
from asap.model.sampling import first_token
from asap.v1 import attention_pb2, attention_pb2_grpc
from tests.procs import ServiceProcess, start_cluster_services

pytestmark = pytest.mark.slow

MODES = ("async", "sync", "sync-chunked")
CHUNK_TOKENS = 16
TOP_LOGPROBS = 5
LENGTHS = (1, 3, 7, 15, 16, 17, 31, 33, 50, 64, 90, 130)  # several longer than one chunk
TOLERANCE = 1e-4

Cluster = tuple[Path, list[ServiceProcess], list[ServiceProcess]]


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    model_dir: Path = request.getfixturevalue(f"{request.param}_dir")
    attention, experts = start_cluster_services(model_dir, attention=2, experts=2)
    try:
        yield model_dir, attention, experts
    finally:
        for proc in (*attention, *experts):
            proc.stop()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _scheduler(model_dir: Path, attention: Sequence[ServiceProcess], mode: str) -> ServiceProcess:
    return ServiceProcess(
        f"scheduler-{mode}",
        ["-m", "scheduler_svc", "--model", str(model_dir), "--port", "0",
         "--attention", ",".join(p.address for p in attention), "--mode", mode,
         "--chunk-tokens", str(CHUNK_TOKENS), "--cost", "0.01,0.00001,1"],
    )  # fmt: skip


async def _prefill_all(address: str, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
    async with AsapClient(address, timeout_s=30, retries=0) as client:
        return list(
            await asyncio.gather(*(client.prefill(tokens=p, top_logprobs=TOP_LOGPROBS) for p in prompts))
        )


def _assert_same(
    got: PrefillResult, expected: PrefillResult | tuple[int, float, list[tuple[int, float]]]
) -> None:
    if isinstance(expected, PrefillResult):
        token, logprob, top = (
            expected.first_token_id,
            expected.first_token_logprob,
            list(expected.top_logprobs),
        )
    else:
        token, logprob, top = expected
    assert got.first_token_id == token
    assert abs(got.first_token_logprob - logprob) <= TOLERANCE
    assert [t for t, _ in got.top_logprobs] == [t for t, _ in top]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got.top_logprobs, top, strict=True)) <= TOLERANCE


async def test_sync_modes_give_the_same_first_tokens_as_async_and_the_reference(cluster: Cluster) -> None:
    model_dir, attention, _ = cluster
    prompts = _prompts()
    schedulers = {mode: _scheduler(model_dir, attention, mode) for mode in MODES}
    results: dict[str, list[PrefillResult]] = {}
    try:
        # One mode at a time: the sync schedulers number their steps from 1 each, so two running at
        # once would meet at the expert barriers.
        for mode in MODES:
            results[mode] = await _prefill_all(schedulers[mode].wait_ready(), prompts)
    finally:
        for proc in schedulers.values():
            proc.stop()

    reference_attention, reference_experts = load_model(model_dir)
    logits = reference_attention.forward([torch.tensor(p) for p in prompts], reference_experts)
    for i, (prompt, row) in enumerate(zip(prompts, logits, strict=True)):
        expected = first_token(row, top_logprobs=TOP_LOGPROBS)
        reference = (expected.token_id, expected.logprob, list(expected.top_logprobs))
        for mode in MODES:
            got = results[mode][i]
            assert got.prompt_tokens == len(prompt), mode
            _assert_same(got, reference)
            if mode != "async":
                _assert_same(got, results["async"][i])
    for mode in ("sync", "sync-chunked"):
        assert {r.attention_rank for r in results[mode]} == {0, 1}, f"{mode}: both ranks take work"


def _assignment(
    batch_id: int, prompts: Sequence[Sequence[int]], *, step: int, participants: int
) -> attention_pb2.BatchAssignment:
    return attention_pb2.BatchAssignment(
        batch_id=batch_id,
        step=step,
        sync_participants=participants,
        prompts=[
            attention_pb2.PromptInput(request_id=f"b{batch_id}-p{i}", token_ids=list(p))
            for i, p in enumerate(prompts)
        ],
    )


async def _run_one(address: str, assignment: attention_pb2.BatchAssignment) -> attention_pb2.BatchResult:
    async def requests() -> AsyncIterator[attention_pb2.BatchAssignment]:
        yield assignment

    async with grpc.aio.insecure_channel(address) as channel:
        results: list[attention_pb2.BatchResult] = [
            r async for r in attention_pb2_grpc.AttentionStub(channel).Run(requests())
        ]
    (result,) = results
    assert not result.HasField("error"), result.error
    return result


LONG_PROMPT = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(11)).tolist()
SHORT_PROMPTS = [[7, 1, 4, 2], [9] * 9, [3, 5], list(range(12))]
POST_NS = 15_000_000
"""After its last MoE layer a batch only runs the final norm, lm_head and sampling of one row per prompt."""


async def _long_and_short(
    attention: Sequence[ServiceProcess], *, step: int, participants: int, short: Sequence[Sequence[int]]
) -> tuple[attention_pb2.BatchResult, attention_pb2.BatchResult]:
    """One long prompt on rank 0 and ``short`` on rank 1, sent together (one sync step if participants)."""
    long_result, short_result = await asyncio.gather(
        _run_one(attention[0].address, _assignment(1, [LONG_PROMPT], step=step, participants=participants)),
        _run_one(attention[1].address, _assignment(2, short, step=step, participants=participants)),
    )
    assert len(long_result.results) == 1 and len(short_result.results) == len(short)
    return long_result, short_result


def _last_dispatch_bound(long: attention_pb2.BatchResult) -> int:
    """A lower bound of when ``long`` sent its last layer's dispatch (after all of its attention): from
    then on it only waited for the experts (at most its whole expert wait) and ran ``POST_NS`` of work."""
    return int(long.finished_unix_nanos - long.expert_wait_nanos - POST_NS)


def _timeline(long: attention_pb2.BatchResult, other: attention_pb2.BatchResult) -> str:
    t0 = long.started_unix_nanos
    return (
        f"long {(long.finished_unix_nanos - t0) / 1e6:.1f} ms (expert wait {long.expert_wait_nanos / 1e6:.1f}),"
        f" other {(other.started_unix_nanos - t0) / 1e6:.1f}..{(other.finished_unix_nanos - t0) / 1e6:.1f} ms"
        f" (expert wait {other.expert_wait_nanos / 1e6:.1f})"
    )


async def test_in_sync_mode_short_prompts_finish_only_after_the_long_prompts_layers(cluster: Cluster) -> None:
    _, attention, _ = cluster
    long_sync, short_sync = await _long_and_short(
        attention, step=1_000_001, participants=2, short=SHORT_PROMPTS
    )
    # At every layer the expert ranks hold the short batch's dispatch until the long one's arrives.
    assert short_sync.finished_unix_nanos >= _last_dispatch_bound(long_sync), _timeline(long_sync, short_sync)
    long_ns = long_sync.finished_unix_nanos - long_sync.started_unix_nanos
    assert short_sync.expert_wait_nanos >= 0.5 * long_ns, _timeline(long_sync, short_sync)
    # ... and report that wait as barrier time: most of the short batch's expert wait, within it.
    assert 0.25 * long_ns <= short_sync.barrier_wait_nanos <= short_sync.expert_wait_nanos
    assert long_sync.barrier_wait_nanos <= long_sync.expert_wait_nanos

    # Unlike async: without the barrier the short batch is done well before the long one (its expert
    # rounds may still queue behind the long one's at the shared expert ranks).
    long_async, short_async = await _long_and_short(attention, step=0, participants=0, short=SHORT_PROMPTS)
    long_async_ns = long_async.finished_unix_nanos - long_async.started_unix_nanos
    assert short_async.finished_unix_nanos < long_async.finished_unix_nanos - 0.25 * long_async_ns, _timeline(
        long_async, short_async
    )
    assert long_async.barrier_wait_nanos == 0 and short_async.barrier_wait_nanos == 0  # no barrier in async

    # The barrier changes timing only.
    for a, b in ((long_async, long_sync), (short_async, short_sync)):
        assert [r.first_token_id for r in a.results] == [r.first_token_id for r in b.results]
        assert all(
            abs(x.first_token_logprob - y.first_token_logprob) <= TOLERANCE
            for x, y in zip(a.results, b.results, strict=True)
        )


async def test_an_idle_rank_in_a_sync_step_runs_an_empty_batch_that_waits_for_the_others(
    cluster: Cluster,
) -> None:
    _, attention, _ = cluster
    busy, idle = await _long_and_short(attention, step=2_000_001, participants=2, short=[])
    assert idle.finished_unix_nanos >= _last_dispatch_bound(busy), _timeline(busy, idle)
    assert idle.expert_wait_nanos >= 0.5 * (busy.finished_unix_nanos - busy.started_unix_nanos)
    assert idle.barrier_wait_nanos >= 0.25 * (busy.finished_unix_nanos - busy.started_unix_nanos)
