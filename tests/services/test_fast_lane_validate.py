"""``FastLane.validate``: the one-pass check of a slot's int32 ids accepts exactly what the full check
accepts and rejects the rest with the full check's messages: ids below -1, at or above the expert count
(INT32 extremes included), and experts another rank hosts; -1 (a slot for another rank) passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asap.emulation import EmulatedExpertPart
from asap.emulation.clock import Sleeper
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import load_config
from expert_svc.core import ExpertExecutor
from expert_svc.fastlane import FastLane


def _lane(model_dir: Path, hosted: list[int] | None = None) -> FastLane:
    config = load_config(model_dir)
    experts = list(range(config.num_experts)) if hosted is None else hosted
    part = EmulatedExpertPart(config, experts, load_profile("h200"), sleeper=Sleeper(bias_s=0.0))
    return FastLane(ExpertExecutor(part), shape_only=True)


def _ids(*values: int) -> np.ndarray:  # type: ignore[type-arg]
    return np.array([values], dtype=np.int32)


def test_in_range_ids_and_minus_one_pass(qwen3_dir: Path) -> None:
    lane = _lane(qwen3_dir)
    layer = lane.executor.part.config.moe_layer_ids[0]
    e = lane._num_experts
    lane.validate(layer, _ids(0, e - 1, -1, 3))
    lane.validate(layer, np.zeros((0, lane.top_k), dtype=np.int32))


@pytest.mark.parametrize("bad", [-2, -(2**31), 10**6, 2**31 - 1])
def test_out_of_range_ids_are_rejected_with_the_range_message(qwen3_dir: Path, bad: int) -> None:
    lane = _lane(qwen3_dir)
    layer = lane.executor.part.config.moe_layer_ids[0]
    with pytest.raises(InvalidArgument, match=r"expert ids must be in \[-1, "):
        lane.validate(layer, _ids(0, bad))
    e = lane._num_experts
    with pytest.raises(InvalidArgument, match=rf"got \[0, {e}\]"):
        lane.validate(layer, _ids(0, e))


def test_experts_hosted_elsewhere_are_named(qwen3_dir: Path) -> None:
    lane = _lane(qwen3_dir, hosted=[0, 1])
    layer = lane.executor.part.config.moe_layer_ids[0]
    lane.validate(layer, _ids(0, 1, -1))
    with pytest.raises(InvalidArgument, match=r"experts \[2, 5\] are not hosted by this rank"):
        lane.validate(layer, np.array([[0, 2], [5, -1]], dtype=np.int32))


def test_other_dtypes_and_layers_take_the_full_check(qwen3_dir: Path) -> None:
    lane = _lane(qwen3_dir)
    layer = lane.executor.part.config.moe_layer_ids[0]
    lane.validate(layer, np.array([[0, -1]], dtype=np.int64))
    with pytest.raises(InvalidArgument, match="expert ids must be in"):
        lane.validate(layer, np.array([[2**32]], dtype=np.int64))  # would wrap to 0 as uint32
    with pytest.raises(InvalidArgument, match="is not an MoE layer"):
        lane.validate(10**6, _ids(0))
