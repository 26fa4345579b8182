"""The key/value cache of one prompt, so that a prompt can be prefilled in consecutive chunks.

A chunk's forward pass writes its K/V after the tokens already cached (``stage``) and makes them part of
the cache only when the whole pass is done (``commit``): a pass abandoned half way (a cancelled request)
leaves the cache exactly as it was, and the next chunk simply overwrites the stale rows.

Storage: per layer one key and one value buffer [kv_heads, capacity, head_dim] in the model dtype and
device, allocated at the first chunk. When a chunk does not fit, the buffer grows to at least twice its
capacity (one copy of what is cached; amortised O(1) copies per token, at most 2x the memory in use).
``reserve`` allocates the final size up front when the prompt length is known, so nothing is copied.
Sliding-window models keep every position too (the window is applied by the attention mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from asap.errors import InvalidArgument
from asap.model.config import ModelConfig


class KVCache:
    """K/V of the tokens of ONE prompt processed so far, per decoder layer (model dtype and device).

    A cache is used by one forward pass at a time (the chunks of a prompt run one after the other).
    """

    def __init__(self, num_layers: int, *, reserve: int = 0) -> None:
        """``reserve``: tokens to allocate room for at the first chunk (0: exactly the first chunk)."""
        if num_layers < 1:
            raise InvalidArgument(f"a KV cache needs at least one layer, got num_layers={num_layers}")
        if reserve < 0:
            raise InvalidArgument(f"reserve must be >= 0, got {reserve}")
        self._num_layers = num_layers
        self._reserve = reserve
        self._length = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers  # [Hkv, capacity, D] each
        self._values: list[torch.Tensor | None] = [None] * num_layers  # [Hkv, capacity, D] each
        self._staged = [0] * num_layers  # tokens written after _length by the pass in progress

    @property
    def num_layers(self) -> int:
        """Decoder layers the cache holds K/V for."""
        return self._num_layers

    @property
    def length(self) -> int:
        """Tokens cached: the position the next chunk starts at."""
        return self._length

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, which may exceed ``length``)."""
        buffers = [t for t in (*self._keys, *self._values) if t is not None]
        return sum(t.numel() * t.element_size() for t in buffers)

    def keys(self, layer: int) -> torch.Tensor:
        """Cached keys of ``layer``, [kv_heads, length, head_dim] (a view; empty before the first chunk)."""
        return self._view(self._keys[layer], self._length)

    def values(self, layer: int) -> torch.Tensor:
        """Cached values of ``layer``, [kv_heads, length, head_dim] (a view)."""
        return self._view(self._values[layer], self._length)

    def check_layout(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``InvalidArgument`` if the cache already holds K/V of another shape, dtype or device."""
        k = self._keys[0]
        if k is None:
            return
        device = torch.device(device)
        # "cuda" names whichever device is current; the buffers always carry an index
        same_device = k.device.type == device.type and device.index in (None, k.device.index)
        if (k.shape[0], k.shape[2], k.dtype) != (kv_heads, head_dim, dtype) or not same_device:
            raise InvalidArgument(
                f"KV cache holds kv_heads={k.shape[0]}, head_dim={k.shape[2]}, {k.dtype} on {k.device}; "
                f"the model needs kv_heads={kv_heads}, head_dim={head_dim}, {dtype} on {device}"
            )

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V of the next chunk, k and v [kv_heads, S, head_dim], after the cached tokens.

        Returns the keys and values of the cached prefix plus the chunk, [kv_heads, length + S, head_dim]
        each (views of the buffers). ``length`` is unchanged until ``commit``.
        """
        count = k.shape[1]
        end = self._length + count
        keys, values = self._keys[layer], self._values[layer]
        if keys is None or values is None or keys.shape[1] < end:
            keys, values = self._grow(keys, k, end), self._grow(values, v, end)
            self._keys[layer], self._values[layer] = keys, values
        keys[:, self._length : end] = k
        values[:, self._length : end] = v
        self._staged[layer] = count
        return keys[:, :end], values[:, :end]

    def commit(self, count: int) -> None:
        """Make the ``count`` tokens staged at every layer part of the cache."""
        if any(staged != count for staged in self._staged):
            raise RuntimeError(f"KV cache: commit of {count} tokens, but layers staged {self._staged}")
        self._length += count
        self._staged = [0] * self._num_layers

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        """A buffer with room for ``needed`` tokens holding the cached rows of ``old``."""
        capacity = max(needed, self._reserve) if old is None else max(needed, 2 * old.shape[1])
        heads, _, head_dim = new.shape
        buffer = new.new_empty((heads, capacity, head_dim))  # [Hkv, capacity, D]
        if old is not None:
            buffer[:, : self._length] = old[:, : self._length]
        return buffer

    @staticmethod
    def _view(buffer: torch.Tensor | None, length: int) -> torch.Tensor:
        if buffer is None:
            return torch.empty(0, 0, 0)
        return buffer[:, :length]


class ChunkCache(Protocol):
    """What a forward pass uses of a ``KVCache``; the emulated attention part stages meta K/V in one."""

    @property
    def num_layers(self) -> int: ...
    @property
    def length(self) -> int: ...
    def check_layout(
        self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None: ...
    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def commit(self, count: int) -> None: ...


def check_caches(
    config: ModelConfig,
    lengths: Sequence[int],
    caches: Sequence[ChunkCache | None],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Check the caches of a batch of chunks of ``lengths`` tokens before a forward pass (the real and
    the emulated attention part alike): one per prompt, none shared, each of the model's layout, and
    no chunk running past ``max_position_embeddings``. Raises ``InvalidArgument``."""
    if len(caches) != len(lengths):
        raise InvalidArgument(f"{len(caches)} KV caches given for {len(lengths)} prompts")
    present = [c for c in caches if c is not None]
    if len({id(c) for c in present}) != len(present):
        raise InvalidArgument("one KV cache is given for two prompts of the same batch")
    for i, (n, cache) in enumerate(zip(lengths, caches, strict=True)):
        if cache is None:
            continue
        if cache.num_layers != config.num_layers:
            raise InvalidArgument(
                f"prompt {i}: KV cache has {cache.num_layers} layers, the model {config.num_layers}"
            )
        heads, key_width, _ = config.kv_cache_layout
        cache.check_layout(heads, key_width, dtype, device)
        if cache.length + n > config.max_position_embeddings:
            raise InvalidArgument(
                f"prompt {i}: {cache.length} cached tokens + a chunk of {n} = {cache.length + n} "
                f"positions, more than max_position_embeddings={config.max_position_embeddings}"
            )
