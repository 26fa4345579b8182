"""The host-side (numpy) routing-table helpers give exactly what their torch versions give.

The simulator's speed comes from these (``split_by_rank`` on host tables, the emulated expert part's
single pass over its ids, the expert executor's id validation); they must not change a single value or
error the services produce.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.emulation.parts import EmulatedExpertPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.attention_part import MoERequest
from asap.model.config import load_config
from asap.model.placement import ExpertPlacement, _split_on_device, _split_on_host, split_by_rank


def _request(tokens: int, experts: int, k: int, seed: int) -> MoERequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) if tokens else None
    if ids is None:
        ids = torch.empty((0, k), dtype=torch.int64)
    weights = torch.rand((tokens, k), generator=g)
    hidden = torch.randn((tokens, 6), generator=g)
    return MoERequest(layer=1, hidden=hidden, topk_ids=ids, topk_weights=weights)


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "ranks"),
    [(1, 8, 2, 4), (37, 16, 4, 5), (200, 64, 8, 16), (0, 8, 2, 2), (2000, 256, 8, 16), (9, 8, 8, 8)],
)
def test_split_on_host_matches_torch(tokens: int, experts: int, k: int, ranks: int) -> None:
    placement = ExpertPlacement(experts, ranks)
    request = _request(tokens, experts, k, seed=tokens + ranks)
    host, device = _split_on_host(placement, request), _split_on_device(placement, request)
    assert [d.rank for d in host] == [d.rank for d in device]
    for a, b in zip(host, device, strict=True):
        for name in ("rows", "hidden", "expert_ids", "weights"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x, y), name


def test_split_on_host_of_int32_ids_and_meta_rows() -> None:
    """int32 routing ids and shape-only (meta) hidden states: the same dispatches, meta rows shaped."""
    placement = ExpertPlacement(64, 8)
    request = _request(300, 64, 8, seed=11)
    meta = MoERequest(
        layer=1,
        hidden=torch.empty((300, 6), dtype=torch.bfloat16, device="meta"),
        topk_ids=request.topk_ids.to(torch.int32),
        topk_weights=request.topk_weights,
    )
    host, device = _split_on_host(placement, meta), _split_on_device(placement, request)
    assert [d.rank for d in host] == [d.rank for d in device]
    for a, b in zip(host, device, strict=True):
        for name in ("rows", "expert_ids", "weights"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.hidden.device.type == "meta" and a.hidden.shape == (b.rows.numel(), 6)
        assert a.hidden.dtype == torch.bfloat16


def test_split_by_rank_uses_the_host_path_for_cpu_tables() -> None:
    placement = ExpertPlacement(16, 4)
    request = _request(50, 16, 4, seed=3)
    got = split_by_rank(placement, request)
    want = _split_on_device(placement, request)
    assert [torch.equal(a.expert_ids, b.expert_ids) for a, b in zip(got, want, strict=True)] == [True] * 4


MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "models"


def _part() -> EmulatedExpertPart:
    config = load_config(MODELS / "qwen3-30b-a3b-8l")
    hosted = list(range(0, config.num_experts, 2))
    return EmulatedExpertPart(config, hosted, load_profile("h200"))


def test_checked_rows_per_expert_counts_as_rows_per_expert() -> None:
    part = _part()
    e, k = part.config.num_experts, part.config.top_k
    assert 2 <= k <= len(part.hosted)
    ids = torch.tensor([[h if (r + c) % 3 else -1 for c, h in enumerate(part.hosted[:k])] for r in range(9)])
    hidden = torch.empty((9, part.config.hidden_size), device="meta")
    weights = torch.zeros(ids.shape)
    counts = part.checked_rows_per_expert(hidden, ids.to(torch.int32), weights)
    expected = [int((ids == h).sum()) for h in part.hosted]
    assert counts == expected == part.rows_per_expert(ids)
    assert len(counts) == len(part.hosted) and e > len(part.hosted)


@pytest.mark.parametrize("bad", [-2, 1, 10_000])
def test_checked_rows_per_expert_raises_as_the_real_part(bad: int) -> None:
    part = _part()
    k = part.config.top_k
    ids = torch.full((3, k), -1, dtype=torch.int64)
    ids[1, 0] = bad  # 1 is hosted by another rank (this part hosts the even ids)
    hidden = torch.empty((3, part.config.hidden_size), device="meta")
    weights = torch.zeros(ids.shape)
    with pytest.raises(InvalidArgument) as fast:
        part.checked_rows_per_expert(hidden, ids, weights)
    with pytest.raises(InvalidArgument) as real:
        part._local_ids(hidden, ids, weights)
    assert str(fast.value) == str(real.value)


def test_checked_rows_per_expert_rejects_bad_shapes() -> None:
    part = _part()
    k = part.config.top_k
    hidden = torch.empty((3, part.config.hidden_size + 1), device="meta")
    with pytest.raises(InvalidArgument, match="hidden has shape"):
        part.checked_rows_per_expert(hidden, torch.zeros((3, k), dtype=torch.int64), torch.zeros((3, k)))
    hidden = torch.empty((3, part.config.hidden_size), device="meta")
    with pytest.raises(InvalidArgument, match="must be integers"):
        part.checked_rows_per_expert(hidden, torch.zeros((3, k)), torch.zeros((3, k)))
