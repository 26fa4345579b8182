"""An attention rank's Prometheus metrics, read at scrape time: its batches and busy time (the
executor's ``AttentionStats``), and per expert rank its link: the data plane in use, the exchange round
trips and failures, and the bytes that went through a region or inline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from asap.metrics.export import Collector, CounterMetricFamily, GaugeMetricFamily, Metric, histogram

if TYPE_CHECKING:
    from attention_svc.server import AttentionService

__all__ = ["AttentionCollector", "attention_collectors"]


class AttentionCollector(Collector):
    def __init__(self, service: AttentionService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        executor, transport = self._service.executor, self._service.transport
        if executor is None or transport is None:
            return
        rank = [str(self._service.config.rank)]
        stats = executor.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["rank"])
            family.add_metric(rank, value)
            return family

        yield counter("asap_attention_batches", "Batches this attention rank finished.", stats.batches)
        yield counter(
            "asap_attention_batch_failures", "Batches that failed on this rank.", stats.failed_batches
        )
        yield counter(
            "asap_attention_prompts", "Prompts (or prompt chunks) in finished batches.", stats.prompts
        )
        yield counter("asap_attention_tokens", "Prompt tokens in finished batches.", stats.tokens)
        yield counter(
            "asap_attention_busy_seconds",
            "Time with at least one batch in flight; its rate is the rank's busy fraction.",
            stats.busy.busy_ns() * 1e-9,
        )
        running = GaugeMetricFamily(
            "asap_attention_running_batches", "Batches in flight now.", labels=["rank"]
        )
        running.add_metric(rank, executor.inflight)
        yield running
        plane = GaugeMetricFamily(
            "asap_data_plane_info",
            "1 for the data plane each link to an expert rank uses (grpc, shm, cuda-ipc, fast).",
            labels=["rank", "expert_rank", "plane"],
        )
        failures = CounterMetricFamily(
            "asap_expert_exchange_failures",
            "Exchanges with the expert rank that failed or were cancelled.",
            labels=["rank", "expert_rank"],
        )
        hidden = CounterMetricFamily(
            "asap_data_plane_hidden_bytes",
            "Hidden-row payload bytes sent to the expert rank, through a shared region or inline.",
            labels=["rank", "expert_rank", "path"],
        )
        for link in transport.links:
            labels = [*rank, str(link.rank)]
            plane.add_metric([*labels, link.data_plane], 1.0)
            failures.add_metric(labels, link.failures)
            hidden.add_metric([*labels, "region"], link.region_hidden_bytes)
            hidden.add_metric([*labels, "inline"], link.inline_hidden_bytes)
        yield plane
        yield histogram(
            "asap_expert_exchange_seconds",
            "One layer's round trip to the expert rank: dispatch handed to the data plane -> combined "
            "result back (successful exchanges).",
            [([*rank, str(link.rank)], link.round_trip_s.snapshot()) for link in transport.links],
            labels=["rank", "expert_rank"],
        )
        yield from (failures, hidden)


def attention_collectors(service: AttentionService) -> Sequence[Collector]:
    return [AttentionCollector(service)]
