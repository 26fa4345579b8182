"""Retry policy of the client: which errors are retried, the backoff, one deadline shared by the attempts,
and the boundary where grpc errors become ``asap.errors`` classes."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator

import grpc

from asap.errors import AsapError, ResourceExhausted, Unavailable
from asap.rpc.status import error_from_rpc, error_from_status

# Prefill has no side effects, so a request refused at admission or not delivered can be sent again.
# INVALID_ARGUMENT fails again unchanged; DEADLINE_EXCEEDED/CANCELLED mean the caller's budget is gone.
RETRYABLE: tuple[type[AsapError], ...] = (ResourceExhausted, Unavailable)
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """The one boundary where grpc errors become ``asap.errors`` classes; no ``RpcError`` escapes."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc


def backoff_s(retry: int) -> float:
    """Exponential backoff with equal jitter before retry number ``retry`` (0-based)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**retry)
    return ceiling / 2 + random.uniform(0.0, ceiling / 2)


class Deadline:
    """One overall time budget shared by every attempt of a call."""

    def __init__(self, timeout_s: float | None) -> None:
        self._at = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (the gRPC ``timeout=`` of the next attempt); ``DeadlineExceeded`` when none."""
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise error_from_status("DEADLINE_EXCEEDED", f"deadline of {self._timeout_s}s exceeded")
        return left

    def allows(self, delay_s: float) -> bool:
        """Whether waiting ``delay_s`` still leaves time for another attempt."""
        return self._at is None or time.monotonic() + delay_s < self._at
