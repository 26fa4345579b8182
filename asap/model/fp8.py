"""Block-wise FP8 checkpoints (DeepSeek-V3's release format): dequantised to bfloat16 as they are read.

A quantised weight ``W`` [rows, cols] is stored as float8 (e4m3) with ``W.weight_scale_inv`` [ceil(rows /
br), ceil(cols / bc)] float32 beside it, one scale per ``weight_block_size`` (br, bc) block:
``W = fp8 * scale`` blockwise. Tensors without a scale (norms, router, embeddings) pass through. The
dequantised weight is rounded to bfloat16, the precision the release is served in, then the loaders cast
it to the model dtype like any other tensor.
"""

from __future__ import annotations

import torch

from asap.errors import CheckpointError
from asap.model.config import ModelConfig
from asap.model.layers import FP8_DTYPES
from asap.model.weights import TensorSource

SCALE_SUFFIX = "_scale_inv"
"""``<name>.weight`` is scaled by ``<name>.weight_scale_inv``."""


def scale_name(name: str) -> str:
    return f"{name}{SCALE_SUFFIX}"


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` [R, C] (any float dtype) times its per-block ``scale`` [ceil(R/br), ceil(C/bc)], in
    float32, rounded to bfloat16."""
    if weight.ndim != 2:
        raise CheckpointError(f"fp8 weight of shape {tuple(weight.shape)} is not a matrix")
    rows, cols = weight.shape
    br, bc = block
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale.shape) != expected:
        raise CheckpointError(
            f"fp8 weight {tuple(weight.shape)} with block {list(block)} needs scales {expected}, "
            f"got {tuple(scale.shape)}"
        )
    full = scale.to(torch.float32).repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return (weight.to(torch.float32) * full).to(torch.bfloat16)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse for tests and tools: ``weight`` [R, C] -> (float8_e4m3fn [R, C], scale_inv float32),
    each block scaled so its largest magnitude maps to e4m3's largest finite value (448)."""
    rows, cols = weight.shape
    br, bc = block
    w = weight.to(torch.float32)
    padded = torch.zeros((-(-rows // br) * br, -(-cols // bc) * bc), dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [R/br, C/bc]
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


class DequantizingSource:
    """A ``TensorSource`` that dequantises block-FP8 tensors of ``source`` on ``get``."""

    def __init__(self, source: TensorSource, block: tuple[int, int]) -> None:
        self.source = source
        self.block = block

    def has(self, name: str) -> bool:
        return self.source.has(name)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        if not self.source.has(scale_name(name)):
            raise CheckpointError(f"fp8 tensor {name!r} has no {scale_name(name)!r} beside it")
        return dequantize_blocks(tensor, self.source.get(scale_name(name)), self.block)


def dequantizing(source: TensorSource, config: ModelConfig) -> TensorSource:
    """``source`` itself, or a ``DequantizingSource`` when config.json declares block-wise fp8 weights."""
    if config.weight_block_size is None:
        return source
    return DequantizingSource(source, config.weight_block_size)
