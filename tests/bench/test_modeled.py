"""The modelled slowest expert call of a layer (``asap.bench.modeled``)."""

from __future__ import annotations

from pathlib import Path

from asap.bench.modeled import slowest_expert_call_s
from asap.emulation import parse_compute
from asap.model.config import load_config

MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "models" / "qwen3-30b-a3b-16l"


def test_the_model_is_repeatable_and_more_ranks_share_the_work() -> None:
    config = load_config(MODEL)
    profile = parse_compute("emulated:h200")[1]
    assert profile is not None
    one = slowest_expert_call_s(config, profile, 1, 64, samples=4)
    assert one == slowest_expert_call_s(config, profile, 1, 64, samples=4)  # seeded routings
    assert 0 < slowest_expert_call_s(config, profile, 4, 64, samples=4) < one
