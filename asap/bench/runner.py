"""Open-loop load: every request is sent at its scheduled time, whether or not earlier ones finished.

A dispatcher sleeps until each request's time and starts it as its own task, so slow responses never
delay later sends (a closed loop would hide queueing: the very thing a TTFT benchmark must show). TTFT
is measured on the client from the *scheduled* send time to the response, so any lag of the client
itself counts against it rather than flattering the server; the server's own ``ttft_ms`` is kept too.

The only brake is ``max_in_flight``: past it the dispatcher waits for a slot, and the run falls behind
schedule. Lag (actual minus scheduled send time) is recorded per request and a warning is logged the
first time it passes ``LAG_WARN_MS``, because from then on the offered load is lower than asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from asap.bench.workload import BenchRequest
from asap.client import PrefillResult
from asap.errors import AsapError

logger = logging.getLogger(__name__)

LAG_WARN_MS = 50.0
OK = "OK"
CLIENT_ERROR = "CLIENT_ERROR"
"""Status of a request that failed with something other than an ``AsapError`` (a client-side bug)."""


class PrefillClient(Protocol):
    """What the runner needs of a client; ``asap.client.AsapClient`` is one."""

    async def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        ttft_slo_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> PrefillResult: ...


class ProgressSink(Protocol):
    """Told about each finished request (``asap.bench.progress.ProgressBar`` is one)."""

    def advance(self, *, failed: bool) -> None: ...


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times in seconds on the loop clock, relative to the run's start."""

    index: int
    warmup: bool
    prompt_tokens: int
    scheduled_s: float
    sent_s: float
    done_s: float = 0.0
    status: str = OK
    server_ttft_ms: float | None = None
    queue_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def ttft_ms(self) -> float:
        """Client-side TTFT: scheduled send time -> response (failures: -> the error)."""
        return (self.done_s - self.scheduled_s) * 1000.0

    @property
    def lag_ms(self) -> float:
        """How late the client sent it (0 when on time)."""
        return max(0.0, (self.sent_s - self.scheduled_s) * 1000.0)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to send: the prompts' seed/vocabulary, the SLO passed to the server, limits."""

    seed: int
    vocab_size: int
    slo_ttft_ms: int | None = None
    timeout_s: float = 60.0
    max_in_flight: int = 4096


async def run_requests(
    client: PrefillClient,
    requests: Sequence[BenchRequest],
    options: RunOptions,
    progress: ProgressSink | None = None,
) -> list[RequestRecord]:
    """Send ``requests`` open-loop and return one record per request, in sequence order."""
    loop = asyncio.get_running_loop()
    # Token ids are made before the clock starts so building them never delays a send.
    prompts = [request.token_ids(options.seed, options.vocab_size) for request in requests]
    slots = asyncio.Semaphore(options.max_in_flight)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    warned = False
    finished = 0

    async def send(record: RequestRecord, tokens: list[int]) -> None:
        nonlocal finished
        try:
            result = await client.prefill(
                tokens=tokens, ttft_slo_ms=options.slo_ttft_ms, timeout_s=options.timeout_s
            )
        except AsapError as exc:
            record.status = exc.code
        except Exception:
            logger.exception("request %d failed in the client", record.index)
            record.status = CLIENT_ERROR
        else:
            record.server_ttft_ms, record.queue_ms = result.ttft_ms, result.queue_ms
        finally:
            record.done_s = loop.time() - start
            finished += 1
            slots.release()
        if progress is not None:
            progress.advance(failed=not record.ok)

    start = loop.time()
    try:
        for request, tokens in zip(requests, prompts, strict=True):
            delay = start + request.send_at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            record = RequestRecord(
                index=request.index,
                warmup=request.warmup,
                prompt_tokens=request.prompt_tokens,
                scheduled_s=request.send_at_s,
                sent_s=loop.time() - start,
            )
            if not warned and record.lag_ms > LAG_WARN_MS:
                warned = True
                logger.warning(
                    "the benchmark client is behind schedule: request %d sent %.0f ms late with %d in "
                    "flight (limit %d); the offered load is lower than asked from here on",
                    request.index,
                    record.lag_ms,
                    len(tasks) - finished,
                    options.max_in_flight,
                )
            records.append(record)
            tasks.append(asyncio.create_task(send(record, tokens), name=f"bench-request-{request.index}"))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return records
