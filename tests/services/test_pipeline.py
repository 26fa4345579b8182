"""The disaggregated pipeline as real processes: 2 attention ranks, 3 expert ranks, loopback grpc."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from asap.model.reference import load_model
from asap.model.sampling import first_token
from asap.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from tests.procs import ServiceProcess, start_cluster_services

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def cluster(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Path, list[ServiceProcess], list[ServiceProcess]]]:
    model_dir: Path = request.getfixturevalue(f"{request.param}_dir")
    attention, experts = start_cluster_services(model_dir, attention=2, experts=3)
    try:
        yield model_dir, attention, experts
    finally:
        for proc in (*attention, *experts):
            proc.stop()


def _assignment(
    batch_id: int, prompts: Sequence[Sequence[int]], top_logprobs: int = 5
) -> attention_pb2.BatchAssignment:
    return attention_pb2.BatchAssignment(
        batch_id=batch_id,
        prompts=[
            attention_pb2.PromptInput(
                request_id=f"b{batch_id}-p{i}",
                token_ids=list(p),
                sampling=common_pb2.SamplingOptions(top_logprobs=top_logprobs),
            )
            for i, p in enumerate(prompts)
        ],
    )


async def _run(
    address: str, assignments: Sequence[attention_pb2.BatchAssignment]
) -> list[attention_pb2.BatchResult]:
    async def requests() -> AsyncIterator[attention_pb2.BatchAssignment]:
        for assignment in assignments:
            yield assignment

    async with grpc.aio.insecure_channel(address) as channel:
        return [r async for r in attention_pb2_grpc.AttentionStub(channel).Run(requests())]


def _prompts(seed: int, count: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (count,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


async def test_both_ranks_match_the_in_process_reference(
    cluster: tuple[Path, list[ServiceProcess], list[ServiceProcess]],
) -> None:
    model_dir, attention, _ = cluster
    batches = {rank: [_prompts(10 * rank + b, count=3 + b, max_len=40) for b in range(3)] for rank in (0, 1)}
    per_rank = await asyncio.gather(
        *(
            _run(
                attention[rank].address, [_assignment(b, prompts) for b, prompts in enumerate(batches[rank])]
            )
            for rank in (0, 1)
        )
    )
    reference_attention, reference_experts = load_model(model_dir)
    checked = 0
    for rank, results in zip((0, 1), per_rank, strict=True):
        assert sorted(r.batch_id for r in results) == [0, 1, 2]
        for result in results:
            prompts = batches[rank][result.batch_id]
            logits = reference_attention.forward([torch.tensor(p) for p in prompts], reference_experts)
            assert not result.HasField("error")
            for prompt_result, prompt, row in zip(result.results, prompts, logits, strict=True):
                expected = first_token(row, top_logprobs=5)
                assert prompt_result.prompt_tokens == len(prompt)
                assert prompt_result.first_token_id == expected.token_id
                assert abs(prompt_result.first_token_logprob - expected.logprob) <= 1e-4
                got = [(t.token_id, t.logprob) for t in prompt_result.top_logprobs]
                assert [t for t, _ in got] == [t for t, _ in expected.top_logprobs]
                assert (
                    max(abs(a - b) for (_, a), (_, b) in zip(got, expected.top_logprobs, strict=True)) <= 1e-4
                )
                checked += 1
    assert checked == sum(len(p) for b in batches.values() for p in b)


async def test_short_prompts_finish_while_a_long_prompt_runs_on_another_rank(
    cluster: tuple[Path, list[ServiceProcess], list[ServiceProcess]],
) -> None:
    _, attention, _ = cluster
    long_prompt = _prompts(99, count=1, max_len=2)[0] * 4000
    long_task = asyncio.create_task(
        _run(attention[0].address, [_assignment(1, [long_prompt], top_logprobs=0)])
    )
    short_results: list[attention_pb2.BatchResult] = []
    async with grpc.aio.insecure_channel(attention[1].address) as channel:
        stub = attention_pb2_grpc.AttentionStub(channel)
        batch_id = 0
        while not long_task.done() and batch_id < 500:
            batch_id += 1

            async def one(b: int = batch_id) -> AsyncIterator[attention_pb2.BatchAssignment]:
                yield _assignment(b, [[1, 2, 3, 4], [5, 6]], top_logprobs=0)

            short_results += [r async for r in stub.Run(one())]
    (long_result,) = await long_task
    assert not long_result.HasField("error")
    overlapped = [
        r
        for r in short_results
        if r.started_unix_nanos > long_result.started_unix_nanos
        and r.finished_unix_nanos < long_result.finished_unix_nanos
    ]
    # No barrier: many short batches start and finish on rank 1 inside the long batch's lifetime on rank 0.
    assert len(overlapped) >= 3, (len(overlapped), len(short_results))


async def test_killing_an_expert_fails_affected_batches_with_unavailable_quickly(
    qwen3_dir: Path,
) -> None:
    attention, experts = start_cluster_services(qwen3_dir, attention=1, experts=3)
    try:
        outbound: asyncio.Queue[attention_pb2.BatchAssignment | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[attention_pb2.BatchAssignment]:
            while (item := await outbound.get()) is not None:
                yield item

        async with grpc.aio.insecure_channel(attention[0].address) as channel:
            call = attention_pb2_grpc.AttentionStub(channel).Run(requests())
            prompts = _prompts(5, count=4, max_len=200)
            await outbound.put(_assignment(1, prompts))
            first = await asyncio.wait_for(call.read(), 30)
            assert not first.HasField("error")

            # Keep batches in flight, kill expert rank 1 in the middle, then keep sending.
            for b in range(2, 6):
                await outbound.put(_assignment(b, prompts))
            experts[1].kill()
            killed_at = time.monotonic()
            for b in range(6, 9):
                await outbound.put(_assignment(b, prompts))
            results = [await asyncio.wait_for(call.read(), 15) for _ in range(7)]
            waited = time.monotonic() - killed_at
            failures = [r for r in results if r.HasField("error")]
            assert failures, "batches after the kill must fail"
            assert all(r.error.code == "UNAVAILABLE" for r in failures), [
                (r.error.code, r.error.message) for r in failures if r.error.code != "UNAVAILABLE"
            ]
            assert all("expert rank 1" in r.error.message for r in failures)
            assert waited < 15
            assert {r.batch_id for r in results} == set(range(2, 9))  # every batch answered, none hangs
            await outbound.put(None)
            assert (await asyncio.wait_for(call.read(), 10)) is grpc.aio.EOF
        assert attention[0].proc.poll() is None, "the attention rank must survive a lost expert"
    finally:
        for proc in (*attention, *experts):
            proc.stop()
        assert all(p.proc.poll() is not None for p in (*attention, *experts))
