"""Warm-up plans (asap.warmup) and the prompt-length buckets SDPA sees on CUDA (asap.model.layers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.config import load_config
from asap.model.grouped import BUCKETS
from asap.model.layers import attention_length_bucket, causal_attention
from asap.model.reference import load_model
from asap.warmup import (
    WARMUP_PROMPT_TOKENS,
    batch_lengths,
    plan_attention_warmup,
    plan_expert_warmup,
    sdpa_lengths,
    warm_attention_kernels,
    warm_attention_rank,
    warm_expert_part,
    warm_prompts,
)


def test_buckets_cover_every_length_with_bounded_padding() -> None:
    for n in range(1, 40000):
        bucket = attention_length_bucket(n)
        assert n <= bucket <= max(64, n + n // 8 + 64)
        assert bucket % 64 == 0
    assert attention_length_bucket(1) == 64
    assert attention_length_bucket(1024) == 1024
    assert attention_length_bucket(1025) == 1152
    assert attention_length_bucket(16385) == 18432


def test_sdpa_lengths_are_the_distinct_buckets() -> None:
    assert sdpa_lengths(16384) == tuple(sorted({attention_length_bucket(n) for n in range(1, 16385)}))
    assert len(sdpa_lengths(16384)) == 48
    assert len(sdpa_lengths(32768)) == 56
    assert sdpa_lengths(100) == (64, 128)
    with pytest.raises(InvalidArgument):
        sdpa_lengths(0)


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_padding_to_the_bucket_leaves_every_real_row_unchanged(n: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, 4, 16, generator=gen)
    k = torch.randn(n, kv_heads, 16, generator=gen)
    v = torch.randn(n, kv_heads, 16, generator=gen)
    plain = causal_attention(q, k, v, scale=0.25, pad_to_bucket=False)
    padded = causal_attention(q, k, v, scale=0.25, pad_to_bucket=True)
    assert padded.shape == plain.shape == (n, 4, 16)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    # a sliding window as long as the prompt still takes the padded path, with the same result
    windowed = causal_attention(q, k, v, scale=0.25, sliding_window=n, pad_to_bucket=True)
    torch.testing.assert_close(windowed, plain, rtol=1e-5, atol=1e-6)


def test_attention_plan(qwen3_dir: Path) -> None:
    config = load_config(qwen3_dir)
    plan = plan_attention_warmup(config, max_batch_tokens=3000, max_prompt_tokens=2048)
    assert plan.sdpa_lengths == sdpa_lengths(2048)
    totals = [sum(batch) for batch in plan.batches]
    assert totals == [b for b in BUCKETS if b < 3000] + [3000]
    assert all(0 < n <= WARMUP_PROMPT_TOKENS for batch in plan.batches for n in batch)
    assert plan.tokens == sum(totals)
    default = plan_attention_warmup(config, max_batch_tokens=512)
    assert default.sdpa_lengths[-1] == attention_length_bucket(config.max_position_embeddings)
    with pytest.raises(InvalidArgument):
        plan_attention_warmup(config, max_batch_tokens=0)


def test_batch_lengths() -> None:
    assert batch_lengths(2500, 1024) == (1024, 1024, 452)
    assert batch_lengths(2048, 1024) == (1024, 1024)
    assert batch_lengths(16, 1024) == (16,)


def test_warm_prompts_spread_over_the_vocabulary(qwen3_dir: Path) -> None:
    config = load_config(qwen3_dir)
    plan = plan_attention_warmup(config, max_batch_tokens=64, max_prompt_tokens=64)
    batches = warm_prompts(plan, config.vocab_size)
    assert [[len(p) for p in batch] for batch in batches] == [list(b) for b in plan.batches]
    ids = [t for batch in batches for prompt in batch for t in prompt]
    assert all(0 <= t < config.vocab_size for t in ids)
    assert len(set(ids)) > len(ids) // 2


def test_expert_plan() -> None:
    plan = plan_expert_warmup(3000)
    assert plan.max_rows == 3000
    assert plan.rows == (1, 16, 17, 32, 64, 128, 256, 512, 1024, 2048, 4095, 4096)
    with pytest.raises(InvalidArgument):
        plan_expert_warmup(0)


class _RecordingExecutor:
    """The two calls ``warm_attention_rank`` makes of an attention executor."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []

    def make_prompt(self, request_id: str, token_ids: Sequence[int]) -> tuple[str, int]:
        return request_id, len(token_ids)

    async def run_batch(self, prompts: Sequence[Any]) -> None:
        self.batches.append(list(prompts))


async def test_warm_attention_rank_runs_every_planned_batch(qwen3_dir: Path) -> None:
    config = load_config(qwen3_dir)
    plan = plan_attention_warmup(config, max_batch_tokens=2100, max_prompt_tokens=256)
    executor = _RecordingExecutor()
    assert await warm_attention_rank(executor, plan, config.vocab_size) == len(plan.batches)
    assert [tuple(n for _, n in batch) for batch in executor.batches] == list(plan.batches)
    ids = [rid for batch in executor.batches for rid, _ in batch]
    assert len(set(ids)) == len(ids) and all(rid.startswith("warm-up-") for rid in ids)


def test_cpu_parts_warm_without_graphs_or_kernels(qwen3_dir: Path) -> None:
    attention, experts = load_model(qwen3_dir, expert_ranks=1)
    plan = plan_attention_warmup(attention.config, max_batch_tokens=64, max_prompt_tokens=64)
    assert warm_attention_kernels(attention, plan) == 0  # nothing is cached per shape on the CPU
    emulated = SimpleNamespace(config=attention.config)  # an emulated part has no device
    assert warm_attention_kernels(emulated, plan) == 0  # type: ignore[arg-type]
    (part,) = experts.parts
    assert warm_expert_part(part, plan_expert_warmup(64)) == 0  # no CUDA graphs on the CPU
