"""Which expert rank hosts which routed expert, and how one MoE layer's work is split and recombined.

``split_by_rank`` turns a ``MoERequest`` into one ``RankDispatch`` per expert rank that is needed (only the
token rows that chose at least one of its experts, other slots masked with -1); ``combine`` adds the
partial results back into a [T, H] tensor. ``InProcessExperts`` wires both around a set of local
``ExpertPart`` objects: the same data path as the distributed services, with the ranks simulated in
process.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asap.devices import wait_attached
from asap.errors import InvalidArgument
from asap.model.attention_part import MoERequest
from asap.model.expert_part import ExpertPart
from asap.model.hosted import HostedCounts
from asap.model.meta import meta_empty


class ExpertPlacement:
    """An assignment of the routed experts to expert ranks (the same for every MoE layer for now)."""

    def __init__(self, num_experts: int, num_ranks: int) -> None:
        """Contiguous blocks: rank r gets the r-th run of experts; the first ``E % R`` ranks get one more."""
        if num_experts <= 0 or num_ranks <= 0:
            raise InvalidArgument(
                f"need positive num_experts and num_ranks, got {num_experts} and {num_ranks}"
            )
        if num_ranks > num_experts:
            raise InvalidArgument(
                f"num_ranks={num_ranks} exceeds num_experts={num_experts}: a rank would be empty"
            )
        base, extra = divmod(num_experts, num_ranks)
        blocks: list[tuple[int, ...]] = []
        start = 0
        for rank in range(num_ranks):
            size = base + (1 if rank < extra else 0)
            blocks.append(tuple(range(start, start + size)))
            start += size
        self._set(blocks)

    @classmethod
    def from_assignment(cls, experts_by_rank: Sequence[Sequence[int]]) -> ExpertPlacement:
        """An explicit placement: ``experts_by_rank[r]`` are rank r's experts; together they must hold
        each of 0..E-1 exactly once, and every rank at least one."""
        blocks = [tuple(sorted(int(e) for e in experts)) for experts in experts_by_rank]
        if not blocks:
            raise InvalidArgument("a placement needs at least one rank")
        empty = [r for r, b in enumerate(blocks) if not b]
        if empty:
            raise InvalidArgument(f"ranks {empty} host no experts")
        flat = sorted(e for b in blocks for e in b)
        if flat != list(range(len(flat))):
            dup = sorted(e for e, n in Counter(flat).items() if n > 1)
            missing = sorted(set(range(max(flat) + 1)) - set(flat))
            raise InvalidArgument(
                f"experts must be assigned exactly once and numbered 0..E-1: duplicated {dup}, "
                f"missing {missing}, negative {[e for e in flat if e < 0]}"
            )
        placement = cls.__new__(cls)
        placement._set(blocks)
        return placement

    def _set(self, blocks: list[tuple[int, ...]]) -> None:
        self.num_ranks = len(blocks)
        self.num_experts = sum(len(b) for b in blocks)
        self._blocks = tuple(blocks)
        table = torch.empty(self.num_experts, dtype=torch.int64)
        for rank, block in enumerate(blocks):
            table[list(block)] = rank
        self._table = table  # [E] expert -> rank
        # the same, for the host-side split (``split_by_rank``); int16 so that its stable sort is a radix sort
        self._table_np = table.numpy().astype(np.int16 if self.num_ranks < 2**15 else np.int64)
        # where each rank's block starts, when every rank holds a contiguous run of experts in rank
        # order (what the constructor makes): the routing's counts per expert are then cut per rank
        # (``split_by_rank(count=True)``)
        runs = all(b == tuple(range(b[0], b[0] + len(b))) for b in blocks)
        ordered = runs and all(a[-1] + 1 == b[0] for a, b in itertools.pairwise(blocks))
        self._starts: np.ndarray | None = (  # type: ignore[type-arg]
            np.asarray([b[0] for b in blocks], dtype=np.intp) if ordered and blocks[0][0] == 0 else None
        )
        self._bounds = [(b[0], b[0] + len(b)) for b in blocks]

    def rank_of(self, expert_id: int, layer: int | None = None) -> int:
        """The rank hosting ``expert_id`` (at ``layer``; placement is currently layer-independent)."""
        if not 0 <= expert_id < self.num_experts:
            raise InvalidArgument(f"expert id {expert_id} is outside [0, {self.num_experts})")
        return int(self._table[expert_id])

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """Sorted expert ids hosted by ``rank``."""
        if not 0 <= rank < self.num_ranks:
            raise InvalidArgument(f"rank {rank} is outside [0, {self.num_ranks})")
        return self._blocks[rank]

    def rank_table(self) -> torch.Tensor:
        """[E] int64: the rank of every expert (a copy)."""
        return self._table.clone()

    def __repr__(self) -> str:
        return f"ExpertPlacement({[list(b) for b in self._blocks]})"


@dataclass(slots=True)
class RankDispatch:
    """The part of one MoE layer's work that goes to one expert rank."""

    rank: int
    rows: torch.Tensor
    """[n] int64 token indices (into the batch's T tokens) routed to at least one expert of this rank."""
    hidden: torch.Tensor
    """[n, H] those tokens' hidden states."""
    expert_ids: torch.Tensor
    """[n, K] int32 global expert ids, -1 where the slot's expert lives on another rank."""
    weights: torch.Tensor
    """[n, K] float32 routing weights, 0 where masked."""
    ready: torch.cuda.Event | None = None
    """CUDA: recorded on the producing stream once the tensors above are computed (see asap.devices)."""
    counted: HostedCounts | None = None
    """``split_by_rank(count=True)``: the rows of ``expert_ids`` per expert of this rank's block and the
    slots that are not -1 (``asap.model.hosted.HostedCounts``), as the expert rank's own check counts
    them; an in-process sender hands them over with the ids (``chunks.Dispatch.counted``). None: not
    counted."""


def split_by_rank(
    placement: ExpertPlacement, request: MoERequest, *, count: bool = False
) -> list[RankDispatch]:
    """Split ``request`` by expert rank: one ``RankDispatch`` per needed rank, in rank order.

    With one expert rank every row goes there (every valid id is that rank's), so the split needs no
    count from the device: no host synchronisation per layer on GPUs. Several ranks need the row counts
    (``nonzero``), which waits for the router. Routing tables in host memory (CPU and emulated compute)
    are split with numpy (``_split_on_host``), the same dispatches at a fraction of the cost.

    ``count`` (host tables of a placement of contiguous blocks in rank order): each dispatch also gets
    its ``counted``, from one count of the whole table (not one per rank, as each expert rank's check
    would make); otherwise they are left None."""
    if placement.num_ranks == 1 and request.hidden.shape[0] > 0:
        tokens = request.hidden.shape[0]
        return [
            RankDispatch(
                rank=0,
                rows=torch.arange(tokens, device=request.topk_ids.device),
                hidden=request.hidden,
                expert_ids=request.topk_ids.to(torch.int32),
                weights=request.topk_weights.float(),
            )
        ]
    if request.topk_ids.device.type == "cpu" and request.topk_weights.device.type == "cpu":
        dispatches = _split_on_host(placement, request)
        if count and dispatches:
            _add_counts(placement, request, dispatches)
        return dispatches
    return _split_on_device(placement, request)


def _add_counts(placement: ExpertPlacement, request: MoERequest, dispatches: list[RankDispatch]) -> None:
    """Each dispatch's ``counted``, cut from one count of the table's ids per expert: its rank's block of
    the counts, and their sum (the slots of its ids that are not -1). Left None unless the blocks are
    contiguous runs in rank order and every id is an expert's (so each slot is counted once, at its
    rank)."""
    starts = placement._starts
    if starts is None:
        return
    ids = request.topk_ids.detach().numpy().reshape(-1)
    if ids.size == 0 or int(np.minimum.reduce(ids)) < 0:
        return
    per_expert = np.bincount(ids, minlength=placement.num_experts)
    if per_expert.size != placement.num_experts:  # an id beyond the model's experts
        return
    used = np.add.reduceat(per_expert, starts).tolist()
    bounds = placement._bounds
    for dispatch in dispatches:
        begin, end = bounds[dispatch.rank]
        dispatch.counted = per_expert[begin:end], used[dispatch.rank]


def _split_on_device(placement: ExpertPlacement, request: MoERequest) -> list[RankDispatch]:
    """``split_by_rank`` with torch ops on the routing tables' own device."""
    ids = request.topk_ids.to(torch.int64)  # [T, K]
    table = placement.rank_table().to(ids.device)
    ranks = table[ids]  # [T, K] rank of each slot
    dispatches = []
    for rank in torch.unique(ranks).tolist():  # sorted
        mine = ranks == rank  # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [n]
        mine = mine[rows]
        dispatches.append(
            RankDispatch(
                rank=int(rank),
                rows=rows,
                hidden=_take_rows(request.hidden, rows),
                expert_ids=torch.where(mine, ids[rows], -1).to(torch.int32),
                weights=torch.where(mine, request.topk_weights[rows].float(), 0.0),
            )
        )
    return dispatches


def _split_on_host(placement: ExpertPlacement, request: MoERequest) -> list[RankDispatch]:
    """``split_by_rank`` for routing tables in host memory, with numpy: the same dispatches, bit for bit,
    at a fraction of the cost (a dozen small torch ops per rank cost ~10 us each in dispatch alone, which
    dominates emulated and simulated runs where these tables are the only real data).

    No sort: a [ranks, tokens] presence table, set from every slot's rank, lists the (rank, token) rows
    in rank-then-token order (its set positions); each row's place in the [N, K] tables, written at its
    cell, is then read back at every slot's cell, and the ids and weights are scattered there, one flat
    write per table. Per rank the tensors are views."""
    k = request.topk_ids.shape[1] if request.topk_ids.ndim == 2 else 1
    ids = request.topk_ids.detach().numpy().reshape(-1, k)  # [T, K]
    if ids.size == 0:
        return []
    weights = request.topk_weights.detach().float().numpy().reshape(-1, k)  # [T, K]
    tokens, num_ranks = ids.shape[0], placement.num_ranks
    ranks = placement._table_np[ids]  # [T, K] rank of each slot
    cell = np.multiply(ranks, tokens, dtype=np.intp)  # [T, K] r * T + t: the slot's (rank, token) row
    cell += np.arange(tokens, dtype=np.intp)[:, None]
    present = np.zeros(num_ranks * tokens, dtype=np.bool_)  # [R * T] rank r needs token t
    present[cell] = True
    # ndarray methods, not the numpy functions: the same values without a Python wrapper's dispatch
    where = present.nonzero()[0]  # [N] the rows' cells, by rank then token
    # [R * T] row * K at each row's cell (the other cells are never read)
    place = np.empty(num_ranks * tokens, dtype=np.intp)
    place[where] = np.arange(0, where.size * k, k, dtype=np.intp)
    flat = place[cell]  # [T, K] the slot's row * K
    flat += np.arange(k, dtype=np.intp)  # [T, K] the slot's place in the [N, K] tables
    expert_ids = np.full(where.size * k, -1, dtype=np.int32)  # [N * K]
    expert_ids[flat] = ids.astype(np.int32, copy=False)
    row_weights = np.zeros(where.size * k, dtype=np.float32)  # [N * K]
    row_weights[flat] = weights
    # [R + 1] rows of the ranks before each: where each rank's cells start among the rows
    upto = where.searchsorted(np.arange(0, (num_ranks + 1) * tokens, tokens, dtype=np.intp))
    per_rank = upto[1:] - upto[:-1]  # [R] rows of each rank
    needed = per_rank.nonzero()[0]
    sizes = per_rank[needed].tolist()
    rows = where - (needed * tokens).repeat(sizes)  # [N] token of each row
    rank_rows = torch.from_numpy(rows).split_with_sizes(sizes)
    rank_ids = torch.from_numpy(expert_ids.reshape(-1, k)).split_with_sizes(sizes)
    rank_weights = torch.from_numpy(row_weights.reshape(-1, k)).split_with_sizes(sizes)
    take = _meta_rows(request.hidden) if request.hidden.device.type == "meta" else None
    return [
        RankDispatch(
            rank=rank,
            rows=rank_rows[i],
            hidden=take(sizes[i]) if take is not None else request.hidden[rank_rows[i]],
            expert_ids=rank_ids[i],
            weights=rank_weights[i],
        )
        for i, rank in enumerate(needed.tolist())
    ]


def _meta_rows(hidden: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """Meta tensors shaped like ``hidden``'s rows (``_take_rows`` of shape-only states), shared per
    shape (``asap.model.meta``)."""
    tail, dtype = tuple(hidden.shape[1:]), hidden.dtype

    def take(n: int) -> torch.Tensor:
        return meta_empty((n, *tail), dtype)

    return take


def _take_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden[rows]`` [n, H]; for shape-only (meta) hidden states a new meta tensor of that shape, since
    indexing a meta tensor goes through Python shape checks (~8 ms per call on a busy host)."""
    if hidden.device.type == "meta":
        return torch.empty((int(rows.numel()), *hidden.shape[1:]), dtype=hidden.dtype, device="meta")
    return hidden[rows]


def combine(
    num_tokens: int,
    request_hidden: torch.Tensor,
    dispatches: Sequence[RankDispatch],
    partials: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Sum the partial results [n_r, H] of each dispatch back into [T, H] (dtype/device of the hidden)."""
    if len(dispatches) != len(partials):
        raise InvalidArgument(f"{len(dispatches)} dispatches but {len(partials)} partial results")
    shape, dtype, device = (num_tokens, request_hidden.shape[-1]), request_hidden.dtype, request_hidden.device
    # shape-only (emulated): no values to zero; ``zeros`` on meta costs ~3x ``empty`` of host time per layer
    meta = device.type == "meta"
    out = meta_empty(shape, dtype) if meta else torch.zeros(shape, dtype=dtype, device=device)
    for dispatch, partial in zip(dispatches, partials, strict=True):
        if partial.is_cuda:
            wait_attached(partial)  # results a GPU plane handed back before they were written
        if partial.shape != (dispatch.rows.numel(), out.shape[1]):
            raise InvalidArgument(
                f"rank {dispatch.rank}: partial result {tuple(partial.shape)} does not match "
                f"{dispatch.rows.numel()} rows of width {out.shape[1]}"
            )
        if meta:  # shape-only (emulated): nothing to add, and meta index_add_ is slow
            continue
        out.index_add_(0, dispatch.rows.to(out.device), partial.to(device=out.device, dtype=out.dtype))
    return out


class InProcessExperts:
    """A dispatch callable over simulated expert ranks: ``parts[r]`` hosts ``placement.experts_of(r)``."""

    def __init__(self, parts: Sequence[ExpertPart], placement: ExpertPlacement) -> None:
        if len(parts) != placement.num_ranks:
            raise InvalidArgument(f"{len(parts)} expert parts for {placement.num_ranks} ranks")
        for rank, part in enumerate(parts):
            expected = placement.experts_of(rank)
            if part.hosted != expected:
                raise InvalidArgument(
                    f"part {rank} hosts {list(part.hosted)}, placement says {list(expected)}"
                )
        self.parts = tuple(parts)
        self.placement = placement

    def __call__(self, request: MoERequest) -> torch.Tensor:
        """Compute the routed experts of ``request``: [T, H] in the dtype of ``request.hidden``."""
        dispatches = split_by_rank(self.placement, request)
        partials = [
            self.parts[d.rank].compute(request.layer, d.hidden, d.expert_ids, d.weights) for d in dispatches
        ]
        return combine(request.hidden.shape[0], request.hidden, dispatches, partials)
