"""What a batch is made of on an attention rank: its validated prompts, their outcomes, the rank's totals.

Kept apart from the executor (``attention_svc.core``) so the servicer and the simulator can name a
batch's parts without pulling in the compute thread and the expert exchange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from asap.errors import AsapError
from asap.metrics import BusyClock
from asap.model.kvcache import KVCache
from asap.model.sampling import FirstToken, first_token


@dataclass(slots=True)
class PromptSpec:
    """A validated prompt of a batch."""

    request_id: str
    token_ids: torch.Tensor  # [n] int64
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    cache: KVCache | None = None
    """Chunked prefill: K/V of the prompt's earlier chunks (extended by this chunk); None = whole prompt."""
    more_chunks: bool = False
    """More chunks of this prompt follow: keep the cache, sample nothing."""


@dataclass(slots=True)
class PromptOutcome:
    request_id: str
    prompt_tokens: int
    first: FirstToken | None = None
    """None for a chunk with more to come (``partial``)."""
    error: AsapError | None = None
    partial: bool = False


@dataclass(slots=True)
class BatchOutcome:
    results: list[PromptOutcome]
    micro_batch: int
    started_ns: int = 0
    finished_ns: int = 0
    expert_wait_ns: int = 0
    barrier_wait_ns: int = 0
    """Sync mode: part of ``expert_wait_ns`` the dispatches spent at the expert ranks' barriers (per layer
    the longest over the expert ranks, summed over layers)."""


@dataclass(slots=True)
class AttentionStats:
    """What a rank has run so far (read by the metrics at scrape time; updated once per batch)."""

    batches: int = 0
    """Batches finished (sync steps with nothing for this rank included)."""
    failed_batches: int = 0
    prompts: int = 0
    tokens: int = 0
    """Prompt tokens (chunk tokens in sync-chunked mode) of the finished batches."""
    busy: BusyClock = field(default_factory=BusyClock)
    """Time with at least one batch in flight on the rank."""


def sample_all(logits: torch.Tensor, prompts: Sequence[PromptSpec]) -> list[FirstToken | None]:
    """Each prompt's first token from its row of ``logits`` [B, V]; None for a chunk with more to come."""
    return [None if p.more_chunks else _sample(logits, i, p) for i, p in enumerate(prompts)]


_ZERO_ROWS: dict[tuple[object, ...], FirstToken] = {}
"""Deterministic draws from all-zero logits rows (see ``_sample``), by vocabulary and sampling options."""
_ZERO_ROWS_MAX = 64


def _sample(logits: torch.Tensor, i: int, p: PromptSpec) -> FirstToken:
    """``first_token`` of row ``i`` of ``logits``. A draw from an all-zero row (+0.0 everywhere: the
    emulated part's logits) depends only on the vocabulary size and the options, so a deterministic one
    (greedy, or seeded) is computed once and reused: a log-softmax over a 151k vocabulary costs ~0.4-0.6
    ms of host time per batch, against ~10 µs for the check (float32 rows in host memory)."""
    row = logits[i]
    opts = {"temperature": p.temperature, "seed": p.seed, "top_logprobs": p.top_logprobs}
    deterministic = p.temperature == 0.0 or p.seed is not None
    zero = (
        deterministic
        and row.ndim == 1
        and row.numel() > 0
        and row.dtype == torch.float32
        and row.device.type == "cpu"
        and row.is_contiguous()
        and not row.detach().numpy().view(np.uint32).any()  # every bit clear: +0.0 everywhere
    )
    if not zero:
        return first_token(row, **opts)  # type: ignore[arg-type]
    key = (row.numel(), row.dtype, p.temperature, p.seed, p.top_logprobs)
    hit = _ZERO_ROWS.get(key)
    if hit is None:
        hit = first_token(row, **opts)  # type: ignore[arg-type]
        if len(_ZERO_ROWS) >= _ZERO_ROWS_MAX:
            _ZERO_ROWS.clear()
        _ZERO_ROWS[key] = hit
    return hit


def prompt_outcomes(
    prompts: Sequence[PromptSpec], firsts: Sequence[FirstToken | None]
) -> list[PromptOutcome]:
    """The outcomes of a finished batch: a prompt whose chunk sampled nothing is ``partial``."""
    return [
        PromptOutcome(p.request_id, int(p.token_ids.numel()), first, partial=first is None)
        for p, first in zip(prompts, firsts, strict=True)
    ]
