"""PartSource: one model spec, dtype and compute backend -> an emulated or a real part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.emulation.loading import PartSource
from asap.emulation.profiles import DeviceProfile
from asap.errors import CheckpointError, InvalidArgument
from asap.model.checkpoint import CheckpointReader
from asap.model.random_weights import RandomTensorSource
from asap.model.resolve import WeightSource


def _kind(source: PartSource) -> str:
    def emulated(profile: DeviceProfile) -> str:
        return f"emulated {profile.name}"

    def real(weights: WeightSource) -> str:
        assert weights.has("model.embed_tokens.weight")
        return type(weights).__name__

    return source.load(device="cpu", emulated=emulated, real=real)


def test_emulated_compute_reads_only_the_config(qwen3_dir: Path) -> None:
    source = PartSource.of(str(qwen3_dir), "bfloat16", "emulated:h200")
    assert source.model_dir == qwen3_dir
    assert source.dtype is torch.bfloat16
    assert source.profile is not None
    assert source.config.num_experts > 0
    assert _kind(source) == f"emulated {source.profile.name}"


def test_real_compute_opens_the_checkpoint_or_random_weights(qwen3_dir: Path) -> None:
    checkpoint = PartSource.of(str(qwen3_dir), "float32", "torch")
    assert checkpoint.profile is None
    assert _kind(checkpoint) == CheckpointReader.__name__
    random = PartSource.of(f"random:{qwen3_dir}", "float32", "torch")
    assert random.model_dir == qwen3_dir
    assert _kind(random) == RandomTensorSource.__name__


def test_bad_values_are_typed_errors(qwen3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        PartSource.of(str(qwen3_dir), "int8", "torch")
    with pytest.raises(InvalidArgument, match="compute"):
        PartSource.of(str(qwen3_dir), "float32", "gpu")
    with pytest.raises(CheckpointError):
        PartSource.of(str(tmp_path / "missing"), "float32", "torch")
