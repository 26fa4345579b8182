"""The chunked-prefill K/V caches an attention rank holds between a prompt's chunks. No grpc here.

In ``sync-chunked`` the scheduler sends a long prompt in chunks, all to the same rank; each chunk after
the first continues the K/V of the earlier ones. The rank keeps that cache by request id from the first
chunk until the last one ran (or the prompt failed, or the scheduler dropped it), and refuses a chunk that
does not continue what it holds, so a lost or repeated chunk fails the prompt instead of computing on the
wrong context.
"""

from __future__ import annotations

from collections.abc import Iterable

from asap.errors import InvalidArgument
from asap.model.kvcache import KVCache

__all__ = ["ChunkCaches"]


class ChunkCaches:
    """K/V of prompts whose later chunks are still to come, by request id."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._held: dict[str, KVCache] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def for_chunk(self, request_id: str, cached_tokens: int, more_chunks: bool) -> KVCache | None:
        """The cache a chunk continues (or starts); None for a whole prompt. ``InvalidArgument`` if the
        chunk does not start where the held cache ends."""
        if cached_tokens == 0 and not more_chunks:
            return None  # a whole prompt
        if cached_tokens == 0:
            cache = KVCache(self.num_layers)
            self._held[request_id] = cache  # a first chunk starts over
            return cache
        held = self._held.get(request_id)
        if held is None or held.length != cached_tokens:
            have = "none" if held is None else f"{held.length} tokens"
            raise InvalidArgument(
                f"request {request_id!r} continues after {cached_tokens} cached tokens, this rank holds {have}"
            )
        return held

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget these prompts' caches (those not held are ignored)."""
        for request_id in request_ids:
            self._held.pop(request_id, None)
