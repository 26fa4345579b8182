"""AttentionExecutor with an in-process transport: parity, interleaving, error propagation (no grpc)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from asap.dataplane.plane import ExchangeResult
from asap.errors import InvalidArgument, Unavailable
from asap.model.placement import InProcessExperts, RankDispatch
from asap.model.reference import load_model
from asap.model.sampling import first_token
from attention_svc.core import AttentionExecutor


class LocalTransport:
    """Expert ranks as in-process parts; each exchange yields to the loop, can be delayed or failed."""

    def __init__(self, experts: InProcessExperts, delay_s: float = 0.0) -> None:
        self.experts = experts
        self.delay_s = delay_s
        self.fail_rank: int | None = None
        self.calls: list[tuple[int, int, int]] = []

    async def exchange(
        self, rank: int, micro_batch: int, layer: int, dispatch: RankDispatch, **sync: object
    ) -> ExchangeResult:
        self.calls.append((rank, micro_batch, layer))
        await asyncio.sleep(self.delay_s)
        if rank == self.fail_rank:
            raise Unavailable(f"expert rank {rank} is gone")
        hidden = self.experts.parts[rank].compute(
            layer, dispatch.hidden, dispatch.expert_ids, dispatch.weights
        )
        return ExchangeResult(hidden)


@pytest.fixture
def model(qwen2_dir: Path) -> tuple[object, InProcessExperts]:
    return load_model(qwen2_dir, expert_ranks=3)


async def test_batch_matches_the_in_process_reference(model: tuple[object, InProcessExperts]) -> None:
    attention, experts = model
    transport = LocalTransport(experts)
    executor = AttentionExecutor(attention, transport, experts.placement)  # type: ignore[arg-type]
    try:
        prompts = [[5, 6, 7], list(range(20, 61)), [9]]
        specs = [executor.make_prompt(f"r{i}", p, top_logprobs=4) for i, p in enumerate(prompts)]
        outcome = await executor.run_batch(specs)
        reference = attention.forward([torch.tensor(p) for p in prompts], experts)  # type: ignore[attr-defined]
        for result, logits in zip(outcome.results, reference, strict=True):
            expected = first_token(logits, top_logprobs=4)
            assert result.first is not None
            assert result.first.token_id == expected.token_id
            assert abs(result.first.logprob - expected.logprob) <= 1e-5
            assert [t for t, _ in result.first.top_logprobs] == [t for t, _ in expected.top_logprobs]
        # every MoE layer reached only the ranks it needed, each once
        layers = {layer for _, _, layer in transport.calls}
        assert layers == set(attention.config.moe_layer_ids)  # type: ignore[attr-defined]
        assert len(transport.calls) == len(set(transport.calls))
    finally:
        executor.close()


async def test_two_batches_interleave_while_waiting_for_experts(
    model: tuple[object, InProcessExperts],
) -> None:
    attention, experts = model
    transport = LocalTransport(experts, delay_s=0.02)
    executor = AttentionExecutor(attention, transport, experts.placement, max_inflight=2)  # type: ignore[arg-type]
    try:
        a = executor.make_prompt("a", [1, 2, 3])
        b = executor.make_prompt("b", [4, 5, 6, 7])
        await asyncio.gather(executor.run_batch([a]), executor.run_batch([b]))
        micro_batches = [mb for _, mb, _ in transport.calls]
        assert set(micro_batches) == {1, 2}
        # the second batch reaches the experts before the first one has finished its layers
        first_of_second = micro_batches.index(2)
        last_of_first = len(micro_batches) - 1 - micro_batches[::-1].index(1)
        assert first_of_second < last_of_first
    finally:
        executor.close()


async def test_lost_expert_rank_fails_the_batch_with_unavailable(
    model: tuple[object, InProcessExperts],
) -> None:
    attention, experts = model
    transport = LocalTransport(experts)
    transport.fail_rank = 1
    executor = AttentionExecutor(attention, transport, experts.placement)  # type: ignore[arg-type]
    try:
        with pytest.raises(Unavailable, match="rank 1"):
            await executor.run_batch([executor.make_prompt("x", list(range(30)))])
        transport.fail_rank = None
        outcome = await executor.run_batch([executor.make_prompt("y", [1, 2])])
        assert outcome.results[0].first is not None
        assert executor.inflight == 0
    finally:
        executor.close()


@pytest.mark.parametrize(
    ("tokens", "options", "match"),
    [
        ([], {}, "empty"),
        ([1, 10_000], {}, "10000"),
        ([1, -1], {}, "-1"),
        ([1], {"temperature": -0.5}, "temperature"),
        ([1], {"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_prompts_are_invalid_argument(
    model: tuple[object, InProcessExperts], tokens: list[int], options: dict[str, float], match: str
) -> None:
    attention, experts = model
    executor = AttentionExecutor(attention, LocalTransport(experts), experts.placement)  # type: ignore[arg-type]
    try:
        with pytest.raises(InvalidArgument, match=match):
            executor.make_prompt("bad", tokens, **options)  # type: ignore[arg-type]
    finally:
        executor.close()
