"""Tensor parallelism of an emulated attention rank: one rank spanning ``tensor_parallel`` devices.

Megatron-style TP splits the heads of attention and the columns/rows of the dense MLPs (and of the
shared expert) over N devices, so each layer's compute is divided by N, and adds two all-reduces of the
layer's hidden states per layer (after the attention output projection and after the MLP), charged as
ring all-reduces at the profile's link bandwidth (``costs.all_reduce_s``). The router, the dispatch to
the expert ranks and the LM head are modelled as on one device (the LM head is small; the dispatch is
one rank's). ``asap simulate --attention-tp N`` uses it; the rank's compute then occupies N devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asap.dtypes import dtype_bytes
from asap.emulation import costs
from asap.emulation.parts import EmulatedAttentionPart
from asap.errors import InvalidArgument

ALL_REDUCES_PER_LAYER = 2


class TensorParallelAttentionPart(EmulatedAttentionPart):
    """``EmulatedAttentionPart`` whose layers take ``1 / tensor_parallel`` of the time plus the
    all-reduces (see the module doc)."""

    def __init__(self, *args: Any, tensor_parallel: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tensor_parallel < 1:
            raise InvalidArgument(f"tensor parallelism must be >= 1, got {tensor_parallel}")
        self.tensor_parallel = tensor_parallel

    def layer_s(
        self, layer: int, prompt_lengths: Sequence[int], prefix_lengths: Sequence[int] | None = None
    ) -> float:
        single = super().layer_s(layer, prompt_lengths, prefix_lengths)
        n = self.tensor_parallel
        if n == 1:
            return single
        nbytes = sum(prompt_lengths) * self.config.hidden_size * dtype_bytes(self.dtype)
        return single / n + ALL_REDUCES_PER_LAYER * costs.all_reduce_s(nbytes, n, self.profile)
