"""ChunkCaches: the chunked-prefill K/V an attention rank keeps between a prompt's chunks."""

from __future__ import annotations

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.kvcache import KVCache
from attention_svc.kvcaches import ChunkCaches


def _grow(cache: KVCache, tokens: int) -> None:
    """What running a chunk of ``tokens`` does to its cache (every layer extended)."""
    for layer in range(cache.num_layers):
        k = torch.zeros(1, tokens, 4)  # [kv_heads, S, head_dim]
        cache.stage(layer, k, k)
    cache.commit(tokens)


def test_a_whole_prompt_needs_no_cache() -> None:
    caches = ChunkCaches(num_layers=2)
    assert caches.for_chunk("r", cached_tokens=0, more_chunks=False) is None
    assert len(caches) == 0


def test_chunks_continue_the_cache_the_first_one_started() -> None:
    caches = ChunkCaches(num_layers=2)
    first = caches.for_chunk("r", cached_tokens=0, more_chunks=True)
    assert first is not None and "r" in caches
    _grow(first, 5)
    assert caches.for_chunk("r", cached_tokens=5, more_chunks=True) is first
    assert caches.for_chunk("r", cached_tokens=5, more_chunks=False) is first  # the last chunk
    caches.drop(["r"])
    assert "r" not in caches and len(caches) == 0


def test_a_chunk_that_does_not_line_up_is_refused() -> None:
    caches = ChunkCaches(num_layers=2)
    with pytest.raises(InvalidArgument, match="holds none"):
        caches.for_chunk("lost", cached_tokens=8, more_chunks=True)
    held = caches.for_chunk("r", cached_tokens=0, more_chunks=True)
    assert held is not None
    _grow(held, 3)
    with pytest.raises(InvalidArgument, match="continues after 8 cached tokens, this rank holds 3 tokens"):
        caches.for_chunk("r", cached_tokens=8, more_chunks=True)


def test_a_first_chunk_starts_over_and_drop_ignores_unknown_ids() -> None:
    caches = ChunkCaches(num_layers=2)
    old = caches.for_chunk("r", cached_tokens=0, more_chunks=True)
    new = caches.for_chunk("r", cached_tokens=0, more_chunks=True)
    assert new is not old and new is not None and new.length == 0
    caches.drop(["never-held", "r"])
    assert len(caches) == 0
