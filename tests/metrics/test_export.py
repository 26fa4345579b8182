"""``MetricsServer``: a per-service registry served over HTTP, its collectors read on the event loop."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asap.errors import Unavailable
from asap.metrics import Distribution
from asap.metrics.export import Collector, CounterMetricFamily, Metric, MetricsServer, histogram


class Counting(Collector):
    """One counter and one histogram; remembers the thread each collect ran on."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.threads: list[threading.Thread] = []
        self.dist = Distribution([0.1, 1.0])

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.current_thread())
        yield CounterMetricFamily("asap_test_things", "Things.", value=self.value)
        yield histogram("asap_test_seconds", "Times.", [((), self.dist.snapshot())])


def samples(text: str) -> dict[str, float]:
    return {
        sample.name + repr(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


async def test_two_services_in_one_process_serve_their_own_values() -> None:
    first, second = Counting(3), Counting(5)
    servers = [MetricsServer([c], host="127.0.0.1", port=0) for c in (first, second)]
    for server in servers:
        assert server.start() > 0  # port 0: a free port, known once bound
    first.dist.observe(0.05)
    first.dist.observe(2.0)
    try:
        texts = [await asyncio.to_thread(get, server.url) for server in servers]
    finally:
        for server in servers:
            server.close()
            server.close()  # idempotent
    one, two = samples(texts[0]), samples(texts[1])
    assert one["asap_test_things_total[]"] == 3 and two["asap_test_things_total[]"] == 5
    assert one["asap_test_seconds_count[]"] == 2 and two["asap_test_seconds_count[]"] == 0
    assert one["asap_test_seconds_bucket[('le', '0.1')]"] == 1
    assert one["asap_test_seconds_bucket[('le', '+Inf')]"] == 2
    assert "process_cpu_seconds_total[]" in one  # process metrics of the service too
    # The HTTP thread handed the collection to the event loop's thread.
    assert first.threads and all(t is threading.main_thread() for t in first.threads)


async def test_scrape_on_the_loop_reads_directly() -> None:
    collector = Counting(1)
    server = MetricsServer([collector], host="127.0.0.1", port=0)
    server.start()
    try:
        assert samples(server.scrape().decode())["asap_test_things_total[]"] == 1
    finally:
        server.close()


async def test_a_port_in_use_is_unavailable() -> None:
    taken = MetricsServer([Counting(0)], host="127.0.0.1", port=0)
    port = taken.start()
    try:
        with pytest.raises(Unavailable, match="cannot serve metrics"):
            MetricsServer([Counting(0)], host="127.0.0.1", port=port).start()
    finally:
        taken.close()
