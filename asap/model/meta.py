"""Shape-only (meta) tensors, one per shape and dtype, made once and shared.

Emulated compute moves meta tensors (shapes, no storage) where real compute moves activations: a
layer's split makes one per expert rank, an emulated expert call one per result. ``torch.empty`` on the
meta device costs ~3 µs of host time each (its dispatch), which the simulator pays millions of times; a
meta tensor has no values to overwrite, so one of each shape can serve every caller. The services never
change a meta tensor's metadata in place (no ``resize_``, no attributes: ``asap.devices.attach_ready`` is
for CUDA results), which is what sharing them needs.
"""

from __future__ import annotations

import torch

__all__ = ["meta_empty"]

_MAX_SHAPES = 1 << 16
_made: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}


def meta_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of ``shape`` and ``dtype`` (``torch.empty(shape, dtype=dtype, device="meta")``),
    the same object for the same shape and dtype (the first ``_MAX_SHAPES`` of them; new ones after)."""
    key = (shape, dtype)
    tensor = _made.get(key)
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device="meta")
        if len(_made) < _MAX_SHAPES:
            _made[key] = tensor
    return tensor
