"""Request-level counts and times of the scheduler, the cluster's request view (no prometheus here).

Every front door records each request's outcome once: ``record_success`` with its result, or
``record_failure`` with the error's status code (``AsapError.code``; ``CANCELLED`` for a caller that went
away). ``scheduler_svc.metrics`` exports these at scrape time.
"""

from __future__ import annotations

import asyncio

from asap.errors import AsapError
from asap.metrics import PREFILL_BUCKETS_S, TOKEN_BUCKETS, Distribution
from scheduler_svc.requests import RequestResult

__all__ = ["OK", "RequestStats", "outcome_code"]

OK = "OK"
"""The outcome code of a request that got its first token."""


class RequestStats:
    """Outcomes by status code, and TTFT, queue, prefill and prompt-length distributions of the
    successful requests."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {OK: 0}
        """Requests finished, by gRPC status code name."""
        self.ttft_s = Distribution(PREFILL_BUCKETS_S)
        """Arrival -> first token."""
        self.queue_s = Distribution(PREFILL_BUCKETS_S)
        """Arrival -> batch sent to an attention rank."""
        self.prefill_s = Distribution(PREFILL_BUCKETS_S)
        """Batch sent -> first token (TTFT minus queue time)."""
        self.prompt_tokens = Distribution(TOKEN_BUCKETS)
        self.prompt_tokens_total = 0

    def record_success(self, result: RequestResult) -> None:
        self.outcomes[OK] += 1
        ttft_s, queue_s = result.ttft_ms / 1e3, result.queue_ms / 1e3
        self.ttft_s.observe(ttft_s)
        self.queue_s.observe(queue_s)
        self.prefill_s.observe(max(0.0, ttft_s - queue_s))
        self.prompt_tokens.observe(result.prompt_tokens)
        self.prompt_tokens_total += result.prompt_tokens

    def record_failure(self, code: str) -> None:
        self.outcomes[code] = self.outcomes.get(code, 0) + 1


def outcome_code(exc: BaseException) -> str:
    """The status code a request that failed with ``exc`` is counted under."""
    if isinstance(exc, AsapError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"  # what grpc answers for an exception that is not ours
