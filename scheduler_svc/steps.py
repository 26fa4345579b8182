"""Planning of one global step for the synchronous baselines (``sync``, ``sync-chunked``). Pure functions.

In a global step every healthy attention rank gets one batch (possibly empty), and the step ends when
the slowest rank finishes: DP attention + EP experts with an all-to-all per layer. The planner makes that
baseline as good as it honestly can be: new requests are placed longest-predicted-first on the rank with
the least predicted work (LPT, ``placement.place_longest_first``), which balances attention cost
(a·n + b·n², so a long prompt counts for more than its tokens), within a per-rank token budget.

``plan_step_per_rank`` is the planner vLLM / SGLang DP+EP users run instead (``--sync-planner
per-rank``): each rank batches from its own queue, filled by a request-count balancer at arrival.

``sync-chunked`` adds chunked prefill: a rank processes at most ``chunk_tokens`` prompt tokens per step;
a prompt longer than what is left of that budget is split, its later chunks continue on the same rank
in the following steps (the rank keeps their K/V), ahead of new work.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.placement import place_longest_first
from scheduler_svc.requests import ScheduledRequest


@dataclass(slots=True, eq=False)
class ChunkItem:
    """Tokens ``start:end`` of ``request`` in this step's batch of one rank."""

    request: ScheduledRequest
    start: int
    end: int

    @property
    def final(self) -> bool:
        return self.end >= self.request.prompt_tokens

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class InProgress:
    """A chunked prompt part-way through, pinned to the rank that holds its K/V."""

    request: ScheduledRequest
    rank: int
    done: int  # tokens processed so far


@dataclass(slots=True)
class StepPlan:
    batches: dict[int, list[ChunkItem]] = field(default_factory=dict)
    """Per healthy rank, its items this step (empty list: the rank still takes part)."""
    started: list[ScheduledRequest] = field(default_factory=list)
    """Requests taken off the pending queue by this step."""

    @property
    def empty(self) -> bool:
        return not any(self.batches.values())


def _continue_chunks(
    plan: StepPlan, in_progress: Iterable[InProgress], budget: int, used: dict[int, int]
) -> Iterator[tuple[InProgress, int]]:
    """Chunked prompts part-way through go first, each on the rank that holds its K/V, as far as that
    rank's ``budget`` allows: appended to ``plan`` and counted in ``used``; yields each with the tokens
    it takes this step."""
    for item in in_progress:
        if item.rank not in plan.batches:
            continue
        take = min(item.request.prompt_tokens - item.done, budget - used[item.rank])
        if take > 0:
            plan.batches[item.rank].append(ChunkItem(item.request, item.done, item.done + take))
            used[item.rank] += take
            yield item, take


def plan_step(
    pending: Iterable[ScheduledRequest],
    in_progress: Sequence[InProgress],
    healthy_ranks: Sequence[int],
    *,
    max_batch_tokens: int,
    max_batch_prompts: int,
    cost: AttentionCostModel,
    chunk_tokens: int | None = None,
) -> StepPlan:
    """Decide every healthy rank's batch for the next step.

    Without ``chunk_tokens`` (``sync``): whole prompts, each rank at most ``max_batch_tokens`` (a single
    longer prompt runs alone on a rank). With it (``sync-chunked``): each rank processes at most
    ``chunk_tokens`` tokens, continuing its in-progress prompts first.
    """
    plan = StepPlan(batches={rank: [] for rank in healthy_ranks})
    if not healthy_ranks:
        return plan
    budget = chunk_tokens if chunk_tokens is not None else max_batch_tokens
    used = dict.fromkeys(healthy_ranks, 0)
    load = dict.fromkeys(healthy_ranks, 0.0)
    for item, take in _continue_chunks(plan, in_progress, budget, used):
        load[item.rank] += cost.prompt_ms(item.done + take) - cost.prompt_ms(item.done)

    # Candidates: a FIFO prefix that could fit in the step's total budget (no skipping ahead). A prompt
    # counts for at most one rank's budget (a longer one runs alone on its rank); with chunking, the last
    # candidate may fit only in part (its first chunk takes what is left).
    room = sum(budget - used[r] for r in healthy_ranks)
    prompts_room = max_batch_prompts * len(healthy_ranks) - sum(len(b) for b in plan.batches.values())
    candidates: list[ScheduledRequest] = []
    tokens = 0
    for request in pending:
        need = min(request.prompt_tokens, budget) if chunk_tokens is None else 1
        if len(candidates) >= prompts_room or (candidates and tokens + need > room):
            break
        candidates.append(request)
        tokens += min(request.prompt_tokens, budget)
    # If packing leaves a candidate out, the longest prefix that packs goes (the rest wait, in order).
    while True:
        placed, left_out = place_longest_first(
            candidates,
            {rank: len(items) for rank, items in plan.batches.items()},
            dict(used),
            dict(load),
            budget=budget,
            max_batch_prompts=max_batch_prompts,
            chunk_tokens=chunk_tokens,
            cost=cost,
        )
        if not left_out:
            break
        candidates.pop()
    for placement in placed:
        plan.batches[placement.rank].append(ChunkItem(placement.request, 0, placement.tokens))
    plan.started = candidates
    return plan


def plan_step_per_rank(
    queues: Mapping[int, Sequence[ScheduledRequest]],
    in_progress: Sequence[InProgress],
    healthy_ranks: Sequence[int],
    *,
    max_batch_tokens: int,
    max_batch_prompts: int,
    chunk_tokens: int | None = None,
) -> StepPlan:
    """Each rank's batch from its own FIFO queue, as every DP engine of vLLM / SGLang DP+EP schedules
    its own waiting queue (``--sync-planner per-rank``; ``queues``: per rank, its requests in arrival
    order, as the front-end balancer assigned them, ``placement.balance_request``).

    A rank continues its in-progress chunks first, then takes whole prompts from the head of its queue
    while they fit its ``max_batch_tokens`` (a longer one runs alone on an otherwise empty rank), and
    stops at the first that does not (no skipping ahead). With ``chunk_tokens`` (``sync-chunked``) the
    budget is ``chunk_tokens`` and the last prompt taken may be split (chunked prefill: its first chunk
    takes what is left). No rank takes another rank's requests, however idle it is: what the global
    ``plan_step`` (longest-first over every rank) does better than these systems.
    """
    plan = StepPlan(batches={rank: [] for rank in healthy_ranks})
    budget = chunk_tokens if chunk_tokens is not None else max_batch_tokens
    used = dict.fromkeys(healthy_ranks, 0)
    for _ in _continue_chunks(plan, in_progress, budget, used):
        pass
    for rank in healthy_ranks:
        batch = plan.batches[rank]
        for request in queues.get(rank, ()):
            room = budget - used[rank]
            if len(batch) >= max_batch_prompts or room <= 0:
                break
            if chunk_tokens is not None:
                take = min(request.prompt_tokens, room)
            elif request.prompt_tokens <= room or used[rank] == 0:
                take = request.prompt_tokens
            else:
                break
            batch.append(ChunkItem(request, 0, take))
            used[rank] += take
            plan.started.append(request)
    return plan
