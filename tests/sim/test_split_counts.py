"""``split_by_rank(count=True)``: each dispatch's counts per expert, made once for all ranks by the
attention rank's split, are what the receiving expert rank's own check counts of the same ids (the
simulator's direct plane hands them over instead of counting again), so the modelled times are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asap.emulation.parts import EmulatedExpertPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.attention_part import MoERequest
from asap.model.config import load_config
from asap.model.hosted import HostedIds
from asap.model.placement import ExpertPlacement, split_by_rank
from expert_svc.core import ExpertExecutor


def _request(tokens: int, experts: int, k: int, seed: int, dtype: torch.dtype = torch.int64) -> MoERequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return MoERequest(
        layer=1,
        hidden=torch.empty((tokens, 6), dtype=torch.bfloat16, device="meta"),
        topk_ids=ids.to(dtype),
        topk_weights=torch.rand((tokens, k), generator=g),
    )


def _totals(counted: tuple[np.ndarray, int]) -> tuple[int, int]:  # type: ignore[type-arg]
    per_expert, used = counted
    return used, int(np.count_nonzero(per_expert))


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "ranks", "dtype"),
    [
        (1, 8, 2, 4, torch.int64),
        (37, 16, 4, 5, torch.int64),
        (200, 64, 8, 16, torch.int32),
        (2000, 256, 8, 16, torch.int64),
        (700, 256, 8, 3, torch.int32),  # tables over 4,096 slots: the check counts their head
    ],
)
def test_counts_match_the_expert_ranks_check(
    tokens: int, experts: int, k: int, ranks: int, dtype: torch.dtype
) -> None:
    placement = ExpertPlacement(experts, ranks)
    request = _request(tokens, experts, k, seed=tokens + ranks, dtype=dtype)
    counted = split_by_rank(placement, request, count=True)
    plain = split_by_rank(placement, request)
    assert [d.rank for d in counted] == [d.rank for d in plain]
    for with_counts, without in zip(counted, plain, strict=True):
        assert without.counted is None
        assert torch.equal(with_counts.expert_ids, without.expert_ids)
        assert with_counts.counted is not None
        block = placement.experts_of(with_counts.rank)
        hosted = HostedIds(block, experts)
        checked = hosted.counts(with_counts.expert_ids.numpy())
        assert checked is not None
        per_expert, used = with_counts.counted
        assert len(per_expert) == len(block)
        assert used == int((with_counts.expert_ids >= 0).sum())
        assert _totals(with_counts.counted) == _totals(checked)
        ids = with_counts.expert_ids.numpy().ravel()
        exact = np.bincount(ids[ids >= 0] - block[0], minlength=len(block))
        assert np.array_equal(per_expert, exact)


def test_no_counts_for_a_scattered_placement() -> None:
    """Blocks that are not contiguous runs in rank order: no counts (the expert rank checks the ids)."""
    placement = ExpertPlacement.from_assignment([[1, 3], [0, 2]])
    dispatches = split_by_rank(placement, _request(20, 4, 2, seed=3), count=True)
    assert dispatches and all(d.counted is None for d in dispatches)
    reordered = ExpertPlacement.from_assignment([[2, 3], [0, 1]])
    dispatches = split_by_rank(reordered, _request(20, 4, 2, seed=3), count=True)
    assert dispatches and all(d.counted is None for d in dispatches)


def test_no_counts_for_ids_outside_the_model() -> None:
    placement = ExpertPlacement(8, 2)
    request = _request(10, 8, 2, seed=5)
    request.topk_ids[0, 0] = -1
    assert all(d.counted is None for d in split_by_rank(placement, request, count=True))


def test_no_counts_for_an_empty_table() -> None:
    request = MoERequest(
        layer=1,
        hidden=torch.empty((0, 6), device="meta"),
        topk_ids=torch.empty((0, 2), dtype=torch.int64),
        topk_weights=torch.empty((0, 2)),
    )
    assert split_by_rank(ExpertPlacement(8, 2), request, count=True) == []


def test_the_expert_rank_takes_a_senders_counts_of_its_block(qwen3_dir: Path) -> None:
    """``ExpertExecutor.counted``: a sender's counts of this rank's block are taken (the layer checked);
    counts of another length are not (None: the rank checks the ids); a dense layer is an error."""
    config = load_config(qwen3_dir)
    hosted = list(range(4, 8))
    executor = ExpertExecutor(EmulatedExpertPart(config, hosted, load_profile("h200")))
    layer = config.moe_layer_ids[0]
    counts = (np.arange(4), 6)
    assert executor.counted(layer, counts) is counts
    assert executor.counted(layer, (np.arange(3), 3)) is None
    with pytest.raises(InvalidArgument, match="not an MoE layer"):
        executor.counted(config.num_layers, counts)
    scattered = ExpertExecutor(EmulatedExpertPart(config, [1, 3], load_profile("h200")))
    assert scattered.counted(layer, (np.arange(2), 1)) is None
