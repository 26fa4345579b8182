"""Placement of work on attention ranks by predicted finish time: pure functions.

Balancing request counts (round robin) ignores that attention grows with the square of the prompt length:
one long prompt can outweigh hundreds of short ones. These functions balance predicted milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from asap.errors import InvalidArgument, Unavailable
from scheduler_svc.costmodel import AttentionCostModel


def least_finish_time(loads_ms: Sequence[float], healthy: Sequence[bool]) -> int:
    """Index of the healthy rank with the least load (the lowest index on ties).

    Raises ``Unavailable`` when no rank is healthy.
    """
    if len(loads_ms) != len(healthy):
        raise InvalidArgument(f"{len(loads_ms)} loads but {len(healthy)} health flags")
    candidates = [rank for rank, ok in enumerate(healthy) if ok]
    if not candidates:
        raise Unavailable(f"no healthy attention rank among {len(healthy)}")
    return min(candidates, key=lambda rank: (loads_ms[rank], rank))


def rank_loads(
    lengths: Sequence[int], assignment: Sequence[int], num_ranks: int, cost: AttentionCostModel
) -> list[float]:
    """Predicted time of each rank when it runs the prompts assigned to it as one batch (0 when idle)."""
    _check_ranks(num_ranks)
    if len(lengths) != len(assignment):
        raise InvalidArgument(f"{len(lengths)} lengths but {len(assignment)} assignments")
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for n, rank in zip(lengths, assignment, strict=True):
        if not 0 <= rank < num_ranks:
            raise InvalidArgument(f"assignment to rank {rank} outside 0..{num_ranks - 1}")
        per_rank[rank].append(n)
    return [cost.batch_ms(group) if group else 0.0 for group in per_rank]


def place_predicted(lengths: Sequence[int], num_ranks: int, cost: AttentionCostModel) -> list[int]:
    """Greedy placement: each prompt, in arrival order, to the rank whose predicted finish time after
    taking it is least. Consistent with ``rank_loads`` (a rank pays the batch overhead once)."""
    _check_ranks(num_ranks)
    loads = [0.0] * num_ranks
    used = [False] * num_ranks
    assignment: list[int] = []
    for n in lengths:
        work = cost.prompt_ms(n)
        finish = [load + work + (0.0 if busy else cost.c_ms) for load, busy in zip(loads, used, strict=True)]
        rank = min(range(num_ranks), key=lambda r: (finish[r], r))
        loads[rank], used[rank] = finish[rank], True
        assignment.append(rank)
    return assignment


def place_round_robin(lengths: Sequence[int], num_ranks: int) -> list[int]:
    """The count-balancing baseline: prompt ``i`` to rank ``i mod num_ranks``."""
    _check_ranks(num_ranks)
    return [i % num_ranks for i in range(len(lengths))]


def _check_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise InvalidArgument(f"num_ranks must be >= 1, got {num_ranks}")
