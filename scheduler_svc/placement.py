"""Placement of batches on attention ranks by predicted finish time: the one place placement is decided.

Balancing request counts (round robin) ignores that attention grows with the square of the prompt length:
one long prompt can outweigh hundreds of short ones. Placement therefore balances predicted milliseconds,
by one rule (``least_loaded``: the least predicted load, the lowest rank on ties) used both by the async
modes (``place_batch``: one batch to the best free rank) and by the sync planner (``place_longest_first``:
a step's new prompts packed over every rank, longest first). Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from asap.errors import InvalidArgument, Unavailable
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.requests import ScheduledRequest


@dataclass(frozen=True, slots=True)
class RankView:
    """What placement sees of one attention rank."""

    healthy: bool
    free_slots: int
    """In-flight batches the rank can still take."""
    predicted_load_ms: float
    """Predicted remaining work already on the rank (never negative)."""
    idle: bool = True
    """No batch is running on the rank."""


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """Send ``requests`` as one batch to ``rank``; ``predicted_ms`` is its predicted cost."""

    rank: int
    requests: list[ScheduledRequest]
    predicted_ms: float


@dataclass(frozen=True, slots=True)
class Placement:
    """The first ``tokens`` tokens of ``request`` go to ``rank`` in this step."""

    request: ScheduledRequest
    rank: int
    tokens: int


def least_loaded(candidates: Iterable[int], load_ms: Mapping[int, float] | Sequence[float]) -> int:
    """The candidate rank with the least predicted load, the lowest rank on ties (``ValueError`` if none)."""
    return min(candidates, key=lambda rank: (load_ms[rank], rank))


def least_finish_time(loads_ms: Sequence[float], healthy: Sequence[bool]) -> int:
    """Index of the healthy rank with the least load (the lowest index on ties).

    Raises ``Unavailable`` when no rank is healthy.
    """
    if len(loads_ms) != len(healthy):
        raise InvalidArgument(f"{len(loads_ms)} loads but {len(healthy)} health flags")
    candidates = [rank for rank, ok in enumerate(healthy) if ok]
    if not candidates:
        raise Unavailable(f"no healthy attention rank among {len(healthy)}")
    return least_loaded(candidates, loads_ms)


def place_batch(
    config: SchedulerConfig, batch: list[ScheduledRequest], ranks: Sequence[RankView]
) -> BatchDecision | None:
    """Send ``batch`` to the free healthy rank with the least predicted finish time (its remaining work
    plus this batch's cost); ``None`` when no rank is free or the batch is empty."""
    solo = sum(request.prompt_tokens for request in batch) > config.dual_batch_max_tokens
    # Dual-batch interleaving is off above the threshold: such a batch only goes to an idle rank.
    available = [view.healthy and view.free_slots > 0 and (view.idle or not solo) for view in ranks]
    if not batch or not any(available):
        return None
    cost = config.cost.batch_ms([request.prompt_tokens for request in batch])
    rank = least_finish_time([view.predicted_load_ms + cost for view in ranks], available)
    return BatchDecision(rank=rank, requests=batch, predicted_ms=cost)


def place_longest_first(
    candidates: Sequence[ScheduledRequest],
    prompts: dict[int, int],
    used: dict[int, int],
    load: dict[int, float],
    *,
    budget: int,
    max_batch_prompts: int,
    chunk_tokens: int | None,
    cost: AttentionCostModel,
) -> tuple[list[Placement], list[ScheduledRequest]]:
    """LPT: longest predicted first, each to the rank with the least predicted load that has room.

    ``prompts``, ``used`` and ``load`` hold, per rank of the step, the prompts, tokens and predicted
    milliseconds it already has; they are updated. Without ``chunk_tokens`` a prompt goes whole (a prompt
    over ``budget`` only to an empty rank); with it, the first chunk takes what is left of a rank's budget.
    Returns the placements in placing order and the candidates that found no rank.
    """
    placed: list[Placement] = []
    left_out: list[ScheduledRequest] = []
    for request in sorted(candidates, key=lambda r: cost.prompt_ms(r.prompt_tokens), reverse=True):
        open_ranks = [
            r
            for r in prompts
            if prompts[r] < max_batch_prompts
            and (
                used[r] + request.prompt_tokens <= budget
                or (chunk_tokens is not None and used[r] < budget)
                or (chunk_tokens is None and used[r] == 0)
            )
        ]
        if not open_ranks:
            left_out.append(request)
            continue
        rank = least_loaded(open_ranks, load)
        take = (
            request.prompt_tokens if chunk_tokens is None else min(request.prompt_tokens, budget - used[rank])
        )
        placed.append(Placement(request, rank, take))
        prompts[rank] += 1
        used[rank] += take
        load[rank] += cost.prompt_ms(take)
    return placed, left_out


def balance_request(waiting: Mapping[int, int], running: Mapping[int, int]) -> int:
    """The rank a front-end balancer sends a new request to: the least ``4 x waiting + running``, the
    lowest rank on ties (``--sync-planner per-rank``).

    This is vLLM's data-parallel load balancer (``vllm/v1/engine/core_client.py``,
    ``DPLBAsyncMPClient.get_core_engine_for_request``: ``score = waiting * 4 + running`` over each
    engine's request counts): it counts requests, not their lengths, so one long prompt weighs what a
    short one does, unlike ``place_longest_first``. ``waiting`` and ``running`` hold the same ranks.
    """
    if not waiting:
        raise Unavailable("no healthy attention rank to balance a request to")
    return min(waiting, key=lambda rank: (4 * waiting[rank] + running[rank], rank))
