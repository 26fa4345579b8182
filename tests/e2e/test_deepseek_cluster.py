"""A tiny deepseek_v3 checkpoint served end to end: ``asap up`` in async and sync-chunked mode (the
chunks carry MLA's compressed latent cache; plain sync runs the same steps without chunks, and costs
another minute of cluster start-up on a small machine), and the gRPC and shared-memory data planes, all
giving the in-process reference's first tokens."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster
from asap.model.reference import load_model
from asap.model.sampling import FirstToken, first_token
from asap.optimizations import OPTIMIZATIONS
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService

pytestmark = pytest.mark.slow

CHUNK_TOKENS = 16
LENGTHS = (1, 7, 16, 17, 40, 90)  # several longer than one chunk
TOLERANCE = 1e-4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(19)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _reference(model_dir: Path, prompts: list[list[int]]) -> list[FirstToken]:
    attention, experts = load_model(model_dir)
    logits = attention.forward([torch.tensor(p) for p in prompts], experts)
    return [first_token(row, top_logprobs=3) for row in logits]


@pytest.mark.parametrize("mode", ["async", "sync-chunked"])
def test_local_cluster_serves_deepseek(deepseek_dir: Path, mode: str) -> None:
    spec = ClusterSpec(
        model=str(deepseek_dir), attention=2, experts=2, mode=mode, port=0, threads=1, min_batch_tokens=0,
        scheduler_args=["--chunk-tokens", str(CHUNK_TOKENS)],
    )  # fmt: skip
    prompts = _prompts()
    cluster = LocalCluster(spec, out=io.StringIO(), start_timeout_s=120)
    try:
        address = cluster.start()
        with AsapClient.connect_sync(address, timeout_s=60, retries=0) as client:
            results = client.prefill_many([{"tokens": p, "top_logprobs": 3} for p in prompts])
            assert client.cluster_state().model_type == "deepseek_v3"
    finally:
        cluster.stop()
    for prompt, result, expected in zip(prompts, results, _reference(deepseek_dir, prompts), strict=True):
        assert result.prompt_tokens == len(prompt)
        assert result.first_token_id == expected.token_id
        assert abs(result.first_token_logprob - expected.logprob) <= TOLERANCE
        assert [t for t, _ in result.top_logprobs] == [t for t, _ in expected.top_logprobs]


@pytest.mark.parametrize("plane", ["grpc", "shm"])
async def test_data_planes_carry_deepseek(deepseek_dir: Path, plane: str) -> None:
    model = str(deepseek_dir)
    experts = [
        ExpertService(
            ExpertServiceConfig(model=model, rank=r, num_ranks=2, optimizations=frozenset(OPTIMIZATIONS))
        )
        for r in range(2)
    ]
    attention = None
    prompts = _prompts()
    try:
        targets = [await e.start() for e in experts]
        attention = AttentionService(
            AttentionServiceConfig(model=model, expert_targets=targets, data_plane=plane)
        )
        await attention.start()
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        outcomes = await executor.run_batch(
            [executor.make_prompt(f"p{i}", p, top_logprobs=3) for i, p in enumerate(prompts)]
        )
        assert {link.data_plane for link in transport.links} == {plane}
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for e in experts:
            await e.stop(grace_s=0)
    for outcome, expected in zip(outcomes.results, _reference(deepseek_dir, prompts), strict=True):
        got = outcome.first  # type: ignore[union-attr]
        assert got.token_id == expected.token_id
        assert abs(got.logprob - expected.logprob) <= TOLERANCE
