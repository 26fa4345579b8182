"""The benchmark's client of a simulated cluster: ``prefill`` straight into the scheduler core.

``asap.bench`` drives any ``BenchClient``; this one does what the scheduler's ``Prefill`` handler does
with a request (a ``ScheduledRequest`` stamped on arrival, its deadline from the timeout, the TTFT SLO
passed on) and answers as ``AsapClient`` would, so the benchmark's open-loop runner, statistics and
report are the ones ``asap bench`` uses, here on the virtual clock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from asap import clock
from asap.client import AttentionRankState, ClusterState, PrefillResult
from asap.sim.cluster import SimCluster


class SimClient:
    """A ``BenchClient`` of one ``SimCluster`` (started)."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self._ids = itertools.count()
        self.ttfts: list[tuple[str, int, float, float]] = []
        """``(request_id, prompt_tokens, ttft_ms, queue_ms)`` of every answered request (``asap.sim.breakdown``)."""

    async def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        ttft_slo_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        from scheduler_svc.requests import ScheduledRequest

        loop = asyncio.get_running_loop()
        request = ScheduledRequest(
            request_id=f"req-{next(self._ids)}",
            token_ids=list(tokens or ()),
            ttft_slo_ms=float(ttft_slo_ms) if ttft_slo_ms else None,
            deadline=loop.time() + timeout_s if timeout_s is not None else None,
            arrival=clock.monotonic(),
        )
        result = await self.cluster.core.submit(request)
        self.ttfts.append((result.request_id, result.prompt_tokens, result.ttft_ms, result.queue_ms))
        return PrefillResult(
            request_id=result.request_id,
            first_token_id=result.first_token_id,
            first_token_logprob=result.first_token_logprob,
            top_logprobs=tuple(result.top_logprobs),
            prompt_tokens=result.prompt_tokens,
            ttft_ms=result.ttft_ms,
            queue_ms=result.queue_ms,
            attention_rank=result.attention_rank,
            trace_id="",
        )

    async def cluster_state(self, *, timeout_s: float | None = None) -> ClusterState:
        cluster = self.cluster
        snapshot = cluster.core.state()
        config = cluster.model_config
        return ClusterState(
            mode=snapshot.mode,
            model_type=config.model_type,
            model=cluster.model,
            attention_ranks=tuple(
                AttentionRankState(
                    rank=r.rank,
                    target=f"sim:attention-{r.rank}",
                    healthy=r.healthy,
                    queued_requests=r.queued_requests,
                    queued_tokens=r.queued_tokens,
                    running_batches=r.running_batches,
                    predicted_load_ms=r.predicted_load_ms,
                )
                for r in snapshot.ranks
            ),
            expert_targets=tuple(f"sim:expert-{e}" for e in range(cluster.spec.experts)),
            pending_requests=snapshot.pending_requests,
            completed_requests=snapshot.completed,
            failed_requests=snapshot.failed,
            vocab_size=config.vocab_size,
            max_prompt_tokens=config.max_position_embeddings,
        )
