"""Tensor parallelism of an emulated attention rank: layer time divided, all-reduces added."""

from __future__ import annotations

from pathlib import Path

import pytest

from asap.emulation import costs
from asap.emulation.parallel import ALL_REDUCES_PER_LAYER, TensorParallelAttentionPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import load_config
from asap.sim.devices import ChargeSleeper


def test_all_reduce_is_a_ring() -> None:
    profile = load_profile("h200")
    assert costs.all_reduce_s(1 << 20, 1, profile) == 0.0
    four = costs.all_reduce_s(1 << 20, 4, profile)
    # 2 (n - 1) = 6 ring steps: 6/4 of the buffer over the link, one launch for the one collective
    # kernel, and the per-step latency six times (NCCL's ring cost model)
    expected = (
        costs.transfer_s(round((1 << 20) * 6 / 4), profile)
        + profile.launch_us * 1e-6
        + 6 * profile.collective_step_us * 1e-6
    )
    assert four == pytest.approx(expected)
    assert profile.collective_step_us == pytest.approx(3.4)
    with pytest.raises(InvalidArgument):
        costs.all_reduce_s(10, 0, profile)


def test_layer_time_is_divided_and_all_reduces_added(qwen3_dir: Path) -> None:
    config, profile = load_config(qwen3_dir), load_profile("h200")
    one = TensorParallelAttentionPart(config, profile, sleeper=ChargeSleeper())
    four = TensorParallelAttentionPart(config, profile, sleeper=ChargeSleeper(), tensor_parallel=4)
    lengths = [300, 50]
    nbytes = sum(lengths) * config.hidden_size * 2  # bf16
    reduce = ALL_REDUCES_PER_LAYER * costs.all_reduce_s(nbytes, 4, profile)
    assert four.layer_s(1, lengths) == pytest.approx(one.layer_s(1, lengths) / 4 + reduce)
    with pytest.raises(InvalidArgument):
        TensorParallelAttentionPart(config, profile, tensor_parallel=0)
