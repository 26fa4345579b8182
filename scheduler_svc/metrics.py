"""The scheduler's Prometheus metrics: the cluster's request-level view, read at scrape time.

Outcomes and request times come from the servicer's ``RequestStats``; waiting and running requests and
the per-rank view from ``SchedulerCore.state()``. Names mirror vLLM's where the quantity is the same
(README, "Metrics").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from asap.metrics.export import Collector, CounterMetricFamily, GaugeMetricFamily, Metric, histogram

if TYPE_CHECKING:
    from scheduler_svc.server import SchedulerService

__all__ = ["SchedulerCollector", "scheduler_collectors"]


class SchedulerCollector(Collector):
    """Reads the scheduler service's stats and core state (on its event loop, see ``MetricsServer``)."""

    def __init__(self, service: SchedulerService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        servicer, core = self._service.servicer, self._service.core
        if servicer is None or core is None:
            return
        stats = servicer.stats
        requests = CounterMetricFamily(
            "asap_requests", "Prefill requests finished, by outcome (gRPC status code).", labels=["code"]
        )
        for code, count in sorted(stats.outcomes.items()):
            requests.add_metric([code], count)
        yield requests
        yield histogram(
            "asap_time_to_first_token_seconds",
            "Arrival at the scheduler to first token known, of successful requests.",
            [((), stats.ttft_s.snapshot())],
        )
        yield histogram(
            "asap_request_queue_time_seconds",
            "Arrival to the request's batch sent to an attention rank.",
            [((), stats.queue_s.snapshot())],
        )
        yield histogram(
            "asap_request_prefill_time_seconds",
            "Batch sent to an attention rank to first token (TTFT minus queue time).",
            [((), stats.prefill_s.snapshot())],
        )
        yield histogram(
            "asap_request_prompt_tokens",
            "Prompt length of successful requests.",
            [((), stats.prompt_tokens.snapshot())],
        )
        yield CounterMetricFamily(
            "asap_prompt_tokens", "Prompt tokens of successful requests.", value=stats.prompt_tokens_total
        )
        snapshot = core.state()
        yield GaugeMetricFamily(
            "asap_num_requests_waiting", "Requests waiting in the scheduler, not yet placed.",
            value=snapshot.pending_requests,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "asap_num_requests_running", "Requests in batches on attention ranks.",
            value=sum(r.running_requests for r in snapshot.ranks),
        )  # fmt: skip
        healthy = GaugeMetricFamily(
            "asap_attention_rank_healthy", "1 when the scheduler places work on the rank.", labels=["rank"]
        )
        running = GaugeMetricFamily(
            "asap_attention_rank_running_batches", "Batches running on the rank, as the scheduler sees it.",
            labels=["rank"],
        )  # fmt: skip
        load = GaugeMetricFamily(
            "asap_attention_rank_predicted_load_seconds",
            "Cost-model estimate of the work placed on the rank and not finished.",
            labels=["rank"],
        )
        for rank in snapshot.ranks:
            label = [str(rank.rank)]
            healthy.add_metric(label, 1.0 if rank.healthy else 0.0)
            running.add_metric(label, rank.running_batches)
            load.add_metric(label, rank.predicted_load_ms / 1e3)
        yield from (healthy, running, load)


def scheduler_collectors(service: SchedulerService) -> Sequence[Collector]:
    return [SchedulerCollector(service)]
