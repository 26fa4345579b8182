"""The barrier share of TTFT: the tap reads the attention ranks' ``BatchResult`` waits, ``breakdown``
joins them with the client's TTFTs by prompt-length class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from asap.sim.breakdown import BatchTap, RequestWaits, breakdown
from asap.v1 import attention_pb2


def _result(ids: list[str], barrier_ns: int, expert_ns: int) -> attention_pb2.BatchResult:
    return attention_pb2.BatchResult(
        results=[attention_pb2.PromptResult(request_id=i) for i in ids],
        barrier_wait_nanos=barrier_ns,
        expert_wait_nanos=expert_ns,
    )


def test_the_tap_adds_up_each_requests_batches_and_passes_results_through() -> None:
    closed: list[bool] = []

    async def handler(requests: AsyncIterator[int]) -> AsyncIterator[attention_pb2.BatchResult]:
        try:
            yield _result(["a", "b"], 3_000_000, 5_000_000)
            yield _result(["a"], 1_000_000, 2_000_000)  # a's second chunk
        finally:
            closed.append(True)

    tap = BatchTap()

    async def main() -> list[attention_pb2.BatchResult]:
        async def no_requests() -> AsyncIterator[int]:
            return
            yield

        from asap.sim.transport import ServicerCall

        call = tap.wrap(lambda requests: ServicerCall(handler(requests)))(no_requests())
        return [result async for result in call]

    results = asyncio.run(main())
    assert [len(r.results) for r in results] == [2, 1]
    assert closed == [True]
    assert tap.requests["a"] == RequestWaits(barrier_ns=4_000_000, expert_wait_ns=7_000_000, batches=2)
    assert tap.requests["b"] == RequestWaits(barrier_ns=3_000_000, expert_wait_ns=5_000_000, batches=1)


def test_breakdown_splits_short_and_long_prompts() -> None:
    waits = {"s": RequestWaits(60_000_000, 70_000_000, 1), "l": RequestWaits(0, 100_000_000, 1)}
    ttfts = [
        ("s", 100, 100.0, 10.0),
        ("l", 5000, 400.0, 40.0),
        ("x", 200, 50.0, 5.0),
    ]  # x: no batch seen, no wait
    table = breakdown(ttfts, waits, split_tokens=1000)
    short, long_ = table["classes"]["short"], table["classes"]["long"]
    assert short["requests"] == 2 and long_["requests"] == 1
    assert short["barrier_share_mean"] == 0.3  # (0.6 + 0.0) / 2
    assert short["barrier_share_of_total"] == 0.4  # 60 / 150
    assert long_["barrier_share_mean"] == 0.0 and long_["expert_wait_ms_mean"] == 100.0
    assert short["queue_ms_mean"] == 7.5 and long_["queue_share_of_total"] == 0.1
    assert table["classes"]["all"]["requests"] == 3
    assert [r["request_id"] for r in table["requests"]] == ["s", "l", "x"]


def test_breakdown_defaults_to_the_median_prompt_and_handles_no_requests() -> None:
    assert breakdown([], {})["classes"] == {}
    table = breakdown([("a", 10, 1.0, 0.0), ("b", 30, 1.0, 0.0), ("c", 50, 1.0, 0.0)], {})
    assert table["split_tokens"] == 30
    assert table["classes"]["short"]["requests"] == 1 and table["classes"]["long"]["requests"] == 2
