"""An expert rank's Prometheus metrics, read at scrape time from its executor (``ExpertStats``, the
queue) and its fast lane: queue depth, compute busy time, chunks, rows and expert calls. The exchange
round trip of each expert rank is measured where it is whole, on the attention ranks
(``asap_expert_exchange_seconds``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from asap.metrics.export import Collector, CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from expert_svc.server import ExpertService

__all__ = ["ExpertCollector", "expert_collectors"]


class ExpertCollector(Collector):
    def __init__(self, service: ExpertService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        executor, exchange = self._service.executor, self._service.exchange
        if executor is None:
            return
        rank = [str(self._service.config.rank)]
        stats = executor.stats
        fast_waiting = exchange.fast.waiting if exchange is not None and exchange.fast is not None else 0
        queue = GaugeMetricFamily(
            "asap_expert_queue_depth",
            "Dispatch chunks waiting for this expert rank's compute thread (queued and fast-plane).",
            labels=["rank"],
        )
        queue.add_metric(rank, executor.queued_chunks + fast_waiting)
        yield queue

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["rank"])
            family.add_metric(rank, value)
            return family

        yield counter(
            "asap_expert_busy_seconds",
            "Host time the compute thread spent computing; its rate is the rank's busy fraction.",
            stats.busy_ns * 1e-9,
        )
        yield counter("asap_expert_chunks", "Dispatch chunks computed.", stats.chunks)
        yield counter("asap_expert_rows", "Token rows computed.", stats.rows)
        yield counter(
            "asap_expert_calls", "Expert computations (same-layer chunks merged into one).", stats.calls
        )


def expert_collectors(service: ExpertService) -> Sequence[Collector]:
    return [ExpertCollector(service)]
