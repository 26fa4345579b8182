"""Configuration of the scheduler service."""

from __future__ import annotations

from dataclasses import dataclass, field

from asap.errors import InvalidArgument
from asap.modes import check_mode
from scheduler_svc.costmodel import AttentionCostModel

SYNC_PLANNERS = ("lpt", "per-rank")
"""``SchedulerConfig.sync_planner``'s values."""


@dataclass(slots=True)
class SchedulerConfig:
    """Batching, admission and placement settings of the scheduler core."""

    max_batch_tokens: int = 8192
    """Upper bound of the prompt tokens of one batch; a single longer prompt runs alone."""
    max_batch_prompts: int = 64
    """Upper bound of the prompts of one batch."""
    max_queue_requests: int = 1024
    """Admission bound: requests waiting to be placed; beyond it ``submit`` raises ``ResourceExhausted``."""
    max_inflight_per_rank: int = 2
    """Batches running concurrently on one attention rank (2 = dual-batch interleaving: while one batch
    waits for the experts, the other computes attention)."""
    cost: AttentionCostModel = field(default_factory=AttentionCostModel)
    """Predicted attention time of a batch, used to place batches by predicted finish time."""
    mode: str = "async"
    """``async`` (no global barrier), or a synchronous baseline: ``sync`` (global steps, every rank runs a
    batch per step and the experts wait for all ranks at every layer) or ``sync-chunked`` (the same with
    chunked prefill)."""
    min_batch_tokens: int = 0
    """Min-size batching (async mode): hold a batch until it has this many prompt tokens (the expert knee,
    from ``asap calibrate``) or its wait bound passed; 0 turns it off."""
    max_wait_ms: float = 50.0
    """Min-size batching: the longest a request is held (a tighter bound comes from its TTFT SLO)."""
    dual_batch_max_tokens: int = 16384
    """Dual-batch interleaving is off for a batch above this many tokens: it runs alone on its rank
    (attention dominates there, and a second batch would only slow it down)."""
    chunk_tokens: int = 8192
    """``sync-chunked``: prompt tokens one rank processes per step; longer prompts are split into chunks."""
    sync_planner: str = "lpt"
    """Sync modes: how a step's batches are chosen. ``lpt`` (the best-placement baseline): one global
    plan, the queue's FIFO prefix packed longest-first over every rank (``steps.plan_step``).
    ``per-rank``: what vLLM / SGLang DP+EP run: a front-end balancer gives each new request a rank by
    request counts (``placement.balance_request``) and every rank takes its step from its own queue
    (``steps.plan_step_per_rank``)."""

    def __post_init__(self) -> None:
        for name in (
            "max_batch_tokens", "max_batch_prompts", "max_queue_requests", "max_inflight_per_rank", "chunk_tokens",
        ):  # fmt: skip
            value = getattr(self, name)
            if value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        check_mode(self.mode)
        if self.sync_planner not in SYNC_PLANNERS:
            raise InvalidArgument(
                f"sync_planner must be one of {', '.join(SYNC_PLANNERS)}, got {self.sync_planner!r}"
            )
