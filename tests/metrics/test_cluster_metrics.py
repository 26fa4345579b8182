"""Metrics of a real local cluster (emulated compute, every port 0): every service's endpoint serves, and
the counts move with the traffic sent."""

from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asap.client import AsapClient, InvalidArgument
from asap.cluster import ClusterSpec, LocalCluster

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3], list(range(40)), list(range(7, 300)), [5] * 17, list(range(100))]


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}."""
    with urllib.request.urlopen(url, timeout=20) as response:
        text = response.read().decode()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        attention=2, experts=2, port=0, threads=1, compute="emulated:h200", min_batch_tokens=0, metrics_port=0
    )
    cluster = LocalCluster(spec, out=io.StringIO(), start_timeout_s=180)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_every_service_serves_its_metrics(cluster: LocalCluster) -> None:
    urls = cluster.metrics_urls()
    assert list(urls) == ["scheduler", "expert-0", "expert-1", "attention-0", "attention-1"]
    assert len(set(urls.values())) == 5
    scheduler = scrape(urls["scheduler"])
    assert scheduler["asap_num_requests_waiting"][()] == 0
    assert {labels for labels in scheduler["asap_attention_rank_healthy"]} == {
        (("rank", "0"),),
        (("rank", "1"),),
    }
    for rank in (0, 1):
        attention = scrape(urls[f"attention-{rank}"])
        planes = attention["asap_data_plane_info"]
        assert {dict(labels)["expert_rank"] for labels in planes} == {"0", "1"}
        assert all(dict(labels)["rank"] == str(rank) and value == 1 for labels, value in planes.items())
        expert = scrape(urls[f"expert-{rank}"])
        assert expert["asap_expert_queue_depth"][(("rank", str(rank)),)] >= 0
        assert "process_resident_memory_bytes" in expert


def test_counts_move_with_the_traffic(cluster: LocalCluster) -> None:
    urls = cluster.metrics_urls()
    before = scrape(urls["scheduler"])
    attention_before = sum(
        scrape(urls[f"attention-{r}"])["asap_attention_prompts_total"][(("rank", str(r)),)] for r in (0, 1)
    )
    assert cluster.address is not None
    with AsapClient.connect_sync(cluster.address, timeout_s=60, retries=0) as client:
        results = client.prefill_many([{"tokens": p} for p in PROMPTS])
        with pytest.raises(InvalidArgument):
            client.prefill(tokens=[10**7])  # beyond the vocabulary: refused by the scheduler
    after = scrape(urls["scheduler"])

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[name].get(labels, 0.0) - before.get(name, {}).get(labels, 0.0)

    sent = len(PROMPTS)
    assert moved("asap_requests_total", (("code", "OK"),)) == sent
    assert moved("asap_requests_total", (("code", "INVALID_ARGUMENT"),)) == 1
    for histogram in (
        "asap_time_to_first_token_seconds",
        "asap_request_queue_time_seconds",
        "asap_request_prefill_time_seconds",
        "asap_request_prompt_tokens",
    ):
        assert moved(f"{histogram}_count") == sent, histogram
        assert moved(f"{histogram}_bucket", (("le", "+Inf"),)) == sent, histogram
    assert moved("asap_request_prompt_tokens_sum") == sum(len(p) for p in PROMPTS)
    assert moved("asap_prompt_tokens_total") == sum(r.prompt_tokens for r in results)
    ttft_sum = moved("asap_time_to_first_token_seconds_sum")
    assert ttft_sum == pytest.approx(sum(r.ttft_ms for r in results) / 1e3, rel=1e-3)
    # Every prompt ran on an attention rank, whose busy time and expert exchanges grew.
    attention = [scrape(urls[f"attention-{r}"]) for r in (0, 1)]
    prompts = sum(a["asap_attention_prompts_total"][(("rank", str(r)),)] for r, a in enumerate(attention))
    assert prompts - attention_before == sent
    busy = sum(a["asap_attention_busy_seconds_total"][(("rank", str(r)),)] for r, a in enumerate(attention))
    assert busy > 0
    exchanges = sum(value for a in attention for value in a["asap_expert_exchange_seconds_count"].values())
    assert exchanges > 0
    experts = [scrape(urls[f"expert-{r}"]) for r in (0, 1)]
    assert all(e["asap_expert_chunks_total"][(("rank", str(r)),)] > 0 for r, e in enumerate(experts))
    assert all(e["asap_expert_busy_seconds_total"][(("rank", str(r)),)] > 0 for r, e in enumerate(experts))


def test_every_exported_metric_is_in_the_readme_table(cluster: LocalCluster) -> None:
    from tests.deploy.test_metrics_deploy import readme_metrics

    exported = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for url in cluster.metrics_urls().values()
        for name in scrape(url)
        if name.startswith("asap_")
    }
    documented = readme_metrics()
    assert exported == documented, (exported - documented, documented - exported)
