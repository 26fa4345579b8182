"""What a rank warms before its health check says SERVING, and the calls that warm it.

Why: a cold rank pays, on its compute thread and in the middle of serving, for everything the first
requests meet for the first time. Measured on an H200 (torch 2.11 + cuDNN 9.19, the headline's
Qwen3-30B-A3B shapes, ``benchmarks/gpu_coldprobe.py``): SDPA runs on cuDNN there, and cuDNN builds one
graph per new prompt length, 45-60 ms each against 0.1-0.4 ms per call once built. A batch of ~20
prompts of distinct lengths therefore cost 500-1450 ms cold against 100-140 ms warm, and the first rate
of every GPU sweep ran at a fraction of later ones (the same prompt lengths replay at every rate, so
later rates hit the cache; with two attention ranks each rank misses the lengths the other one saw,
hence the gradual recovery over several rates). The cache is thread-local (cuDNN execution plans are not
shared across threads), so it must be filled on the thread that serves.

The fix has two halves: ``asap.model.layers.causal_attention`` pads each prompt on CUDA to its
``attention_length_bucket`` (48 shapes up to 16k tokens instead of one per length), and the plans here
say what to run at start-up: SDPA at every bucket (on the compute thread), then a few real batches
through the whole path (projection GEMMs of each token bucket, the caching allocator grown to the
largest batch, expert graphs, data-plane slots). ``CUDA_MODULE_LOADING=EAGER`` in the ranks' environment
(``asap.cluster``) loads every kernel up front, which also removes the lazy-loading hang of DESIGN §9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from asap.errors import InvalidArgument
from asap.model.config import ModelConfig
from asap.model.grouped import BUCKETS, bucket_for
from asap.model.layers import attention_length_bucket

if TYPE_CHECKING:
    from asap.model.attention_part import AttentionPart
    from asap.model.expert_part import ExpertPart

WARMUP_PROMPT_TOKENS = 1024
"""Longest prompt of the warm-up batches: they warm per-token work (GEMMs, allocator, experts); the
per-length attention shapes are warmed directly, at every bucket."""
DEFAULT_MAX_PROMPT_TOKENS = 32768
"""Longest prompt whose attention shape is warmed when the model allows longer ones."""


WARMUP_BATCH_TOKENS = 16384
"""Largest batch an attention rank warms up for (twice the scheduler's default --max-batch-tokens)."""


@dataclass(frozen=True, slots=True)
class AttentionWarmup:
    """What an attention rank runs before SERVING."""

    sdpa_lengths: tuple[int, ...]
    """Every padded prompt length SDPA can meet (``attention_length_bucket`` of 1..max prompt tokens)."""
    batches: tuple[tuple[int, ...], ...]
    """Prompt lengths of each warm-up batch: one batch per token bucket up to the largest batch."""

    @property
    def tokens(self) -> int:
        """Prompt tokens of all warm-up batches together."""
        return sum(sum(batch) for batch in self.batches)


@dataclass(frozen=True, slots=True)
class ExpertWarmup:
    """What an expert rank runs before SERVING."""

    max_rows: int
    """Largest merged computation (``ExpertPart.prepare`` captures every graph bucket up to it)."""
    rows: tuple[int, ...]
    """Row counts computed once each on the eager path: the buckets, and odd sizes (Triton specialises
    integer arguments on divisibility by 16 and on 1)."""


def sdpa_lengths(max_prompt_tokens: int) -> tuple[int, ...]:
    """The distinct ``attention_length_bucket`` values of prompts of 1..``max_prompt_tokens`` tokens."""
    if max_prompt_tokens < 1:
        raise InvalidArgument(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    lengths: list[int] = []
    n = 1
    while n <= max_prompt_tokens:
        bucket = attention_length_bucket(n)
        lengths.append(bucket)
        n = bucket + 1
    return tuple(lengths)


def batch_lengths(total: int, prompt_tokens: int = WARMUP_PROMPT_TOKENS) -> tuple[int, ...]:
    """``total`` tokens as prompts of ``prompt_tokens`` (the last one shorter)."""
    full, rest = divmod(total, prompt_tokens)
    return (prompt_tokens,) * full + ((rest,) if rest else ())


def plan_attention_warmup(
    config: ModelConfig, *, max_batch_tokens: int, max_prompt_tokens: int | None = None
) -> AttentionWarmup:
    """The warm-up of an attention rank of ``config`` that serves batches of up to ``max_batch_tokens``
    prompt tokens and prompts of up to ``max_prompt_tokens`` (default: the model's limit, capped at
    ``DEFAULT_MAX_PROMPT_TOKENS``)."""
    if max_batch_tokens < 1:
        raise InvalidArgument(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    longest = max_prompt_tokens or min(config.max_position_embeddings, DEFAULT_MAX_PROMPT_TOKENS)
    totals = sorted({b for b in BUCKETS if b < max_batch_tokens} | {max_batch_tokens})
    return AttentionWarmup(
        sdpa_lengths=sdpa_lengths(longest), batches=tuple(batch_lengths(t) for t in totals)
    )


def plan_expert_warmup(max_merge_rows: int) -> ExpertWarmup:
    """The warm-up of an expert rank that merges up to ``max_merge_rows`` rows into one computation."""
    if max_merge_rows < 1:
        raise InvalidArgument(f"max_merge_rows must be >= 1, got {max_merge_rows}")
    largest = bucket_for(max_merge_rows)
    buckets = [b for b in BUCKETS if b <= largest]
    return ExpertWarmup(max_rows=max_merge_rows, rows=tuple(sorted({1, 17, *buckets, largest - 1})))


def warm_prompts(plan: AttentionWarmup, vocab_size: int) -> list[list[list[int]]]:
    """Token ids of each warm-up batch: spread over the vocabulary, so routing reaches many experts (a
    repeated id would send every token to the same few)."""
    batches = []
    offset = 0
    for batch in plan.batches:
        prompts = []
        for n in batch:
            prompts.append([(offset + i) * 7919 % vocab_size for i in range(n)])
            offset += n
        batches.append(prompts)
    return batches


def warm_attention_kernels(part: AttentionPart, plan: AttentionWarmup) -> int:
    """Run SDPA once at every length of ``plan`` on the calling thread; returns the shapes run (0 on
    CPU and for emulated parts, where nothing is cached per shape). Call it on the thread that will
    compute attention: cuDNN keeps its graphs per thread."""
    import torch

    from asap.model.layers import causal_attention

    device = getattr(part, "device", None)  # an emulated part has none: nothing to warm
    if not isinstance(device, torch.device) or device.type != "cuda":
        return 0
    cfg = part.config
    run = 0
    with torch.inference_mode():
        shortest = 1
        for bucket in plan.sdpa_lengths:
            # The shortest prompt of each bucket: it takes the padded path exactly when real ones do
            # (a sliding window shorter than the prompt takes the masked path, which is not bucketed).
            n, shortest = shortest, bucket + 1
            if cfg.sliding_window is not None and n > cfg.sliding_window:
                break
            q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=part.dtype, device=device)
            kv = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=part.dtype, device=device)
            causal_attention(q, kv, kv, scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window)
            run += 1
        torch.cuda.synchronize(device)
    return run


class BatchRunner(Protocol):
    """What ``warm_attention_rank`` needs of an attention executor (``AttentionExecutor`` is one)."""

    def make_prompt(self, request_id: str, token_ids: Sequence[int]) -> Any: ...

    async def run_batch(self, prompts: Sequence[Any]) -> Any: ...


async def warm_attention_rank(executor: BatchRunner, plan: AttentionWarmup, vocab_size: int) -> int:
    """Run the plan's batches through ``executor`` (attention, every expert rank, the data plane);
    returns the batches run."""
    batches = warm_prompts(plan, vocab_size)
    for b, batch in enumerate(batches):
        await executor.run_batch(
            [executor.make_prompt(f"warm-up-{b}-{i}", tokens) for i, tokens in enumerate(batch)]
        )
    return len(batches)


def warm_expert_part(part: ExpertPart, plan: ExpertWarmup) -> int:
    """Capture the part's graphs up to ``plan.max_rows`` and compute each of ``plan.rows`` once on the
    first MoE layer, on the calling thread (the compute thread); returns the graphs captured."""
    import torch

    graphs = part.prepare(plan.max_rows)
    cfg = part.config
    layer = cfg.moe_layer_ids[0]
    with torch.inference_mode():
        for n in plan.rows:
            ids = torch.full((n, cfg.top_k), -1, dtype=torch.int32)
            ids[:, 0] = torch.tensor(part.hosted, dtype=torch.int32)[torch.arange(n) % len(part.hosted)]
            weights = torch.zeros(n, cfg.top_k, dtype=torch.float32)
            hidden = torch.zeros(n, cfg.hidden_size, dtype=part.dtype, device=part.device)
            part.compute(layer, hidden, ids, weights)
        if part.device.type == "cuda":
            torch.cuda.synchronize(part.device)
    return graphs


__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "WARMUP_BATCH_TOKENS",
    "WARMUP_PROMPT_TOKENS",
    "AttentionWarmup",
    "BatchRunner",
    "ExpertWarmup",
    "batch_lengths",
    "plan_attention_warmup",
    "plan_expert_warmup",
    "sdpa_lengths",
    "warm_attention_kernels",
    "warm_attention_rank",
    "warm_expert_part",
    "warm_prompts",
]
