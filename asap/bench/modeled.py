"""The modelled expert side of one MoE layer under emulated compute, for the benchmarks that compare a
measured layer with its model (``benchmarks/emulated_layer_cost.py``, ``benchmarks/layer_hops.py``):
a layer waits for its slowest expert rank, so the model is that rank's call, averaged over random
routings (seeded, so both benchmarks and every run see the same ones).
"""

from __future__ import annotations

import statistics

import torch

from asap.emulation import DeviceProfile, EmulatedExpertPart
from asap.model.config import ModelConfig
from asap.model.placement import ExpertPlacement

__all__ = ["slowest_expert_call_s"]


def slowest_expert_call_s(
    config: ModelConfig, profile: DeviceProfile, experts: int, tokens: int, *, samples: int = 20
) -> float:
    """Seconds of the slowest of ``experts`` ranks' modelled calls for ``tokens`` tokens routed at random
    (top-k distinct experts each), the mean over ``samples`` routings."""
    placement = ExpertPlacement(config.num_experts, experts)
    parts = [EmulatedExpertPart(config, placement.experts_of(r), profile) for r in range(experts)]
    g = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(samples):
        ids = torch.stack(
            [torch.randperm(config.num_experts, generator=g)[: config.top_k] for _ in range(tokens)]
        )
        calls.append(max(part.call_s(ids) for part in parts))
    return statistics.mean(calls)
