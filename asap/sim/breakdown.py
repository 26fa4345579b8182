"""Where a request's TTFT went: the share spent waiting at the sync barrier, per request and per class.

Nothing here measures anything itself: the attention rank already reports, in every ``BatchResult``,
the time its batch spent awaiting combine results (``expert_wait_nanos``) and the part of it the expert
ranks held its chunks at the per-layer barrier (``barrier_wait_nanos``: per layer the longest wait over
the expert ranks, summed over layers; the expert service's ``StepBarrier`` measures it). The same numbers
reach the scheduler of a real cluster over gRPC; here ``BatchTap`` reads them off the in-process stream
between the scheduler and each attention rank, and ``breakdown`` joins them with the TTFTs the benchmark
client saw. A request split into several batches (``sync-chunked``) adds up its batches' waits.
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from asap.v1 import attention_pb2

__all__ = ["BatchTap", "RequestWaits", "breakdown"]

Req = TypeVar("Req")


@dataclass(slots=True)
class RequestWaits:
    """One request's waits, summed over the batches it ran in (nanoseconds)."""

    barrier_ns: int = 0
    expert_wait_ns: int = 0
    batches: int = 0


class BatchTap:
    """Records every ``BatchResult`` an attention rank's ``Run`` stream yields, by request id."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestWaits] = {}

    def record(self, result: attention_pb2.BatchResult) -> None:
        for prompt in result.results:
            waits = self.requests.setdefault(prompt.request_id, RequestWaits())
            waits.barrier_ns += result.barrier_wait_nanos
            waits.expert_wait_ns += result.expert_wait_nanos
            waits.batches += 1

    def wrap(self, opener: Callable[[AsyncIterator[Req]], Any]) -> Callable[[AsyncIterator[Req]], Any]:
        """``opener`` (``asap.sim.transport.servicer_opener``) whose calls' results pass through here."""
        from asap.sim.transport import ServicerCall

        tap = self

        def open_call(requests: AsyncIterator[Req]) -> Any:
            call = opener(requests)
            handler = aiter(call)

            async def results() -> AsyncIterator[attention_pb2.BatchResult]:
                try:
                    async for result in handler:
                        tap.record(result)
                        yield result
                finally:  # a cancelled call ends the servicer's handler too, as without the tap
                    if isinstance(handler, AsyncGenerator):
                        await handler.aclose()

            return ServicerCall(results())

        return open_call


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def breakdown(
    ttfts: Iterable[tuple[str, int, float, float]],
    waits: Mapping[str, RequestWaits],
    split_tokens: int | None = None,
) -> dict[str, Any]:
    """Per-class barrier share of TTFT from ``(request_id, prompt_tokens, ttft_ms, queue_ms)`` and the
    tap's waits. ``queue_ms`` (the scheduler's: arrival -> batch sent; in sync modes it includes waiting
    for the running step to end) is reported beside it, not counted as barrier wait.

    Classes: ``short`` (prompt below ``split_tokens``; default the median prompt length) and ``long``.
    Each class reports the mean of the per-request shares and the share of the summed TTFTs."""
    rows: list[dict[str, Any]] = []
    for request_id, tokens, ttft_ms, queue_ms in ttfts:
        w = waits.get(request_id, RequestWaits())
        rows.append(
            {
                "request_id": request_id,
                "prompt_tokens": tokens,
                "ttft_ms": round(ttft_ms, 3),
                "queue_ms": round(queue_ms, 3),
                "barrier_ms": round(w.barrier_ns / 1e6, 3),
                "expert_wait_ms": round(w.expert_wait_ns / 1e6, 3),
                "barrier_share": round(_share(w.barrier_ns / 1e6, ttft_ms), 4),
            }
        )
    if not rows:
        return {"split_tokens": split_tokens, "classes": {}, "requests": []}
    split = (
        split_tokens if split_tokens is not None else int(statistics.median(r["prompt_tokens"] for r in rows))
    )
    classes: dict[str, Any] = {}
    for name, members in (
        ("short", [r for r in rows if r["prompt_tokens"] < split]),
        ("long", [r for r in rows if r["prompt_tokens"] >= split]),
        ("all", rows),
    ):
        if not members:
            continue
        ttft = sum(r["ttft_ms"] for r in members)
        barrier = sum(r["barrier_ms"] for r in members)
        expert = sum(r["expert_wait_ms"] for r in members)
        queue = sum(r["queue_ms"] for r in members)
        classes[name] = {
            "requests": len(members),
            "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in members)),
            "ttft_ms_mean": round(ttft / len(members), 2),
            "barrier_ms_mean": round(barrier / len(members), 2),
            "expert_wait_ms_mean": round(expert / len(members), 2),
            "queue_ms_mean": round(queue / len(members), 2),
            "queue_share_of_total": round(_share(queue, ttft), 4),
            "barrier_share_mean": round(statistics.fmean(r["barrier_share"] for r in members), 4),
            "barrier_share_of_total": round(_share(barrier, ttft), 4),
        }
    return {"split_tokens": split, "classes": classes, "requests": rows}
