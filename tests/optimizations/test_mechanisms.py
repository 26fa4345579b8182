"""Mechanisms of the four optimizations, each checked on its own (no grpc)."""

from __future__ import annotations

from pathlib import Path

import torch

from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.placement import RankView, place_batch
from scheduler_svc.ranks import RankBatch, RankState
from scheduler_svc.requests import ScheduledRequest


def test_dual_batch_is_off_above_the_threshold() -> None:
    """A batch over dual_batch_max_tokens only goes to an idle rank, and takes its other slot too."""
    config = SchedulerConfig(dual_batch_max_tokens=1000)
    long = [ScheduledRequest("long", [1] * 1500)]
    short = [ScheduledRequest("short", [1] * 10)]
    busy_free = RankView(healthy=True, free_slots=1, predicted_load_ms=0.0, idle=False)
    idle = RankView(healthy=True, free_slots=2, predicted_load_ms=50.0, idle=True)
    assert place_batch(config, long, [busy_free]) is None
    decision = place_batch(config, long, [busy_free, idle])
    assert decision is not None and decision.rank == 1
    assert place_batch(config, short, [busy_free]) is not None  # short batches still interleave

    state = RankState()
    state.batches[1] = RankBatch(1, 0, long, predicted_ms=10.0)
    assert state.view(max_inflight=2, now=0.0, solo_tokens=1000).free_slots == 0
    state.batches[1] = RankBatch(1, 0, short, predicted_ms=10.0)
    assert state.view(max_inflight=2, now=0.0, solo_tokens=1000).free_slots == 1


def test_layer_agnostic_routine_equals_per_layer_modules(qwen2_dir: Path) -> None:
    """One routine over stacked weights serves every layer with the same outputs as per-layer modules."""
    config = load_config(qwen2_dir)
    with CheckpointReader(qwen2_dir) as reader:
        part = ExpertPart.from_source(reader, config, list(range(config.num_experts)))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, config.hidden_size, generator=g)
    ids = torch.randint(-1, config.num_experts, (13, config.top_k), generator=g)
    weights = torch.rand(13, config.top_k, generator=g)
    for layer in config.moe_layer_ids:
        part.layer_agnostic = True
        stacked = part.compute(layer, hidden, ids, weights)
        part.layer_agnostic = False
        per_layer = part.compute(layer, hidden, ids, weights)
        assert torch.equal(stacked, per_layer)
        assert stacked.abs().sum() > 0
    assert part._per_layer is not None and len(part._per_layer) == len(config.moe_layer_ids)
