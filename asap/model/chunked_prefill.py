"""Chunked prefill of one prompt end to end: the reference the chunked serving modes are checked against.

A prefill chunk is a run of a prompt's tokens; not to be confused with the wire's dispatch chunks
(``asap.wire.chunks``), size-bounded pieces of one MoE layer's exchange."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asap.errors import InvalidArgument
from asap.model.attention_part import AttentionPart, ExpertCompute
from asap.model.kvcache import KVCache


def prefill_chunked(
    attention: AttentionPart,
    dispatch: ExpertCompute,
    tokens: Sequence[int] | torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Prefill ``tokens`` in consecutive chunks of ``chunk_size`` (the last may be shorter), each chunk
    attending to the K/V of the earlier ones; returns the logits of the last position, [V] float32.

    Equal to ``attention.forward([tokens], dispatch)[0]`` up to float rounding.
    """
    if chunk_size < 1:
        raise InvalidArgument(f"chunk_size must be >= 1, got {chunk_size}")
    ids = attention.validate_prompt(tokens)  # [N]
    cache = KVCache(attention.config.num_layers, reserve=int(ids.numel()))
    logits = torch.empty(0)
    for start in range(0, int(ids.numel()), chunk_size):
        chunk = ids[start : start + chunk_size]
        logits = attention.forward([chunk], dispatch, caches=[cache])  # [1, V]
    return logits[0]
