"""ExpertPlacement, split_by_rank and combine."""

from __future__ import annotations

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.attention_part import MoERequest
from asap.model.placement import ExpertPlacement, combine, split_by_rank


@pytest.mark.parametrize(
    ("experts", "ranks", "expected"),
    [
        (8, 2, [(0, 1, 2, 3), (4, 5, 6, 7)]),
        (7, 3, [(0, 1, 2), (3, 4), (5, 6)]),
        (5, 3, [(0, 1), (2, 3), (4,)]),
        (4, 4, [(0,), (1,), (2,), (3,)]),
        (3, 1, [(0, 1, 2)]),
    ],
)
def test_contiguous_blocks_with_remainder_first(
    experts: int, ranks: int, expected: list[tuple[int, ...]]
) -> None:
    placement = ExpertPlacement(experts, ranks)
    assert placement.num_experts == experts and placement.num_ranks == ranks
    assert [placement.experts_of(r) for r in range(ranks)] == expected
    table = placement.rank_table()
    assert table.dtype == torch.int64 and table.shape == (experts,)
    for rank, block in enumerate(expected):
        for e in block:
            assert placement.rank_of(e) == rank == int(table[e])
            assert placement.rank_of(e, layer=3) == rank


@pytest.mark.parametrize(("experts", "ranks"), [(0, 1), (4, 0), (-1, 2), (3, 4)])
def test_bad_sizes_are_rejected(experts: int, ranks: int) -> None:
    with pytest.raises(InvalidArgument):
        ExpertPlacement(experts, ranks)


def test_lookups_outside_the_placement_are_rejected() -> None:
    placement = ExpertPlacement(4, 2)
    with pytest.raises(InvalidArgument, match="expert id 4"):
        placement.rank_of(4)
    with pytest.raises(InvalidArgument, match="rank 2"):
        placement.experts_of(2)


def test_rank_table_is_a_copy() -> None:
    placement = ExpertPlacement(4, 2)
    placement.rank_table()[:] = 9
    assert placement.rank_of(0) == 0


def test_from_assignment_accepts_any_partition() -> None:
    placement = ExpertPlacement.from_assignment([[3, 1], [0, 2, 4]])
    assert placement.num_experts == 5 and placement.num_ranks == 2
    assert placement.experts_of(0) == (1, 3)
    assert placement.rank_table().tolist() == [1, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ([[0, 1], [1, 2]], "duplicated \\[1\\]"),
        ([[0, 1], [3]], "missing \\[2\\]"),
        ([[0], []], "host no experts"),
        ([], "at least one rank"),
        ([[-1, 0], [1]], "negative \\[-1\\]"),
    ],
)
def test_from_assignment_validates(assignment: list[list[int]], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ExpertPlacement.from_assignment(assignment)


def _request(tokens: int = 9, hidden: int = 6, experts: int = 7, k: int = 3, seed: int = 0) -> MoERequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return MoERequest(
        layer=0,
        hidden=torch.randn(tokens, hidden, generator=g),
        topk_ids=ids,
        topk_weights=torch.rand(tokens, k, generator=g),
    )


def _fake_expert(e: int, x: torch.Tensor) -> torch.Tensor:
    return x * (e + 1) + e  # distinct per expert, cheap


def _dense(request: MoERequest) -> torch.Tensor:
    out = torch.zeros_like(request.hidden)
    for t in range(request.hidden.shape[0]):
        for e, w in zip(request.topk_ids[t].tolist(), request.topk_weights[t].tolist(), strict=True):
            out[t] += w * _fake_expert(e, request.hidden[t])
    return out


def _partial(dispatch_hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(dispatch_hidden)
    for n in range(ids.shape[0]):
        for e, w in zip(ids[n].tolist(), weights[n].tolist(), strict=True):
            if e >= 0:
                out[n] += w * _fake_expert(e, dispatch_hidden[n])
    return out


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_split_and_combine_reproduce_the_dense_computation(ranks: int) -> None:
    request = _request()
    placement = ExpertPlacement(7, ranks)
    dispatches = split_by_rank(placement, request)
    assert [d.rank for d in dispatches] == sorted({d.rank for d in dispatches})
    for d in dispatches:
        assert d.rows.dtype == torch.int64 and d.expert_ids.dtype == torch.int32
        assert d.weights.dtype == torch.float32
        own = torch.tensor(placement.experts_of(d.rank))
        valid = d.expert_ids >= 0
        assert bool(torch.isin(d.expert_ids[valid], own).all())
        assert bool(valid.any(dim=1).all())  # only rows with work for this rank
        assert bool((d.weights[~valid] == 0).all())
        assert torch.equal(d.hidden, request.hidden[d.rows])
    # every (token, slot) goes to exactly one rank
    slots = sum(int((d.expert_ids >= 0).sum()) for d in dispatches)
    assert slots == request.topk_ids.numel()
    partials = [_partial(d.hidden, d.expert_ids, d.weights) for d in dispatches]
    combined = combine(request.hidden.shape[0], request.hidden, dispatches, partials)
    torch.testing.assert_close(combined, _dense(request))


def test_only_needed_ranks_are_returned() -> None:
    request = _request()
    request.topk_ids = torch.tensor([[0, 5, 6]] * 9)  # ranks 0 and 2 of ExpertPlacement(7, 3)
    dispatches = split_by_rank(ExpertPlacement(7, 3), request)
    assert [d.rank for d in dispatches] == [0, 2]
    assert dispatches[0].expert_ids.tolist() == [[0, -1, -1]] * 9
    assert dispatches[1].expert_ids.tolist() == [[-1, 5, 6]] * 9


def test_tokens_without_work_for_a_rank_are_not_sent_there() -> None:
    request = _request(tokens=3)
    request.topk_ids = torch.tensor([[0, 1, 2], [4, 5, 6], [0, 1, 6]])
    dispatches = split_by_rank(ExpertPlacement(7, 2), request)  # rank 0: 0..3, rank 1: 4..6
    assert dispatches[0].rows.tolist() == [0, 2]
    assert dispatches[1].rows.tolist() == [1, 2]


def test_combine_rejects_mismatched_partials() -> None:
    request = _request()
    dispatches = split_by_rank(ExpertPlacement(7, 2), request)
    with pytest.raises(InvalidArgument):
        combine(9, request.hidden, dispatches, [torch.zeros(1, 6)] * len(dispatches))
    with pytest.raises(InvalidArgument):
        combine(9, request.hidden, dispatches, [])


def test_combine_of_shape_only_rows_is_a_meta_tensor_of_the_layer_and_still_checks_shapes() -> None:
    """Emulated compute: rows and results are meta tensors; the combined layer is one too (no values to
    zero or add), shaped [T, H] in the hidden's dtype, and mismatched partials are still refused."""
    request = _request()
    meta_hidden = torch.empty(tuple(request.hidden.shape), dtype=torch.bfloat16, device="meta")
    request.hidden = meta_hidden
    dispatches = split_by_rank(ExpertPlacement(7, 2), request)
    partials = [torch.empty(d.rows.numel(), 6, dtype=torch.bfloat16, device="meta") for d in dispatches]
    out = combine(9, meta_hidden, dispatches, partials)
    assert (out.shape, out.dtype, out.device.type) == ((9, 6), torch.bfloat16, "meta")
    with pytest.raises(InvalidArgument):
        combine(9, meta_hidden, dispatches, [torch.empty(1, 6, device="meta")] * len(dispatches))
