"""Calibration of the scheduler's attention cost model: probe batches timed on an attention rank.

Placement predicts a batch's time with ``a·n + b·n² + c`` (``costmodel``); the defaults are rough. At
start-up the service times probe prompts of several lengths on rank 0 and hands the fitted model to the
core (``SchedulerCore.set_cost_model``) before it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asap import clock
from asap.errors import AsapError, Unavailable
from asap.model.config import ModelConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.ranks import RankClient
from scheduler_svc.requests import ScheduledRequest

logger = logging.getLogger(__name__)

CALIBRATION_LENGTHS = (8, 256, 1024, 2048, 4096, 8192, 16384)
"""Probe prompt lengths (clipped to the model maximum): long enough to see the quadratic attention term."""
CALIBRATION_BATCH_IDS = 1 << 48  # far above the core's batch ids


async def calibrate_cost_model(
    ranks: RankClient,
    config: ModelConfig,
    repeats: int = 2,
    *,
    on_rank_down: Callable[[int, str], None] | None = None,
) -> AttentionCostModel:
    """Time probe batches of one prompt of several lengths on attention rank 0 and fit ``a·n + b·n² + c``.

    The measured time is the whole batch (attention, expert round trips, sampling), which is what
    placement needs to predict. Falls back to the default model if the probes fail; if rank 0 was lost
    meanwhile (``Unavailable`` from the client), ``on_rank_down(0, reason)`` reports it first.
    """
    lengths = sorted({min(n, config.max_position_embeddings) for n in CALIBRATION_LENGTHS})
    samples: list[tuple[list[int], float]] = []
    try:
        for i in range(repeats + 1):
            for n in lengths if i > 0 else [n for n in lengths if n <= 1024]:  # warm-up: short ones
                probe = ScheduledRequest(
                    request_id=f"calibrate-{i}-{n}",
                    token_ids=[t % min(256, config.vocab_size) for t in range(n)],
                )
                started = clock.perf_counter()
                try:
                    outcome = await ranks.run_batch(0, CALIBRATION_BATCH_IDS + i * 10_000 + n, [probe])
                except Unavailable as exc:
                    if on_rank_down is not None:
                        on_rank_down(0, exc.message)
                    raise
                if isinstance(outcome[0], AsapError):
                    raise outcome[0]
                if i > 0:  # the first round warms caches up
                    samples.append(([n], (clock.perf_counter() - started) * 1e3))
        cost = AttentionCostModel.fit(samples)
    except AsapError as exc:
        logger.warning("cost model calibration failed (%s); using defaults", exc.message)
        return AttentionCostModel()
    logger.info(
        "calibrated attention cost: a=%.4g ms/token b=%.4g ms/token^2 c=%.3g ms",
        cost.a_ms,
        cost.b_ms,
        cost.c_ms,
    )
    return cost
