"""``RankClient`` over grpc: one long-lived ``Attention.Run`` stream per attention rank.

A lost stream fails the batches waiting on it with ``Unavailable`` and reports the rank down; a monitor
re-checks down ranks with grpc health and reports them up again once they answer SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from asap.errors import AsapError, InternalError, Unavailable
from asap.rpc.health import check_health_async
from asap.rpc.server import GRPC_OPTIONS
from asap.rpc.status import error_from_rpc, error_from_wire
from asap.telemetry import setup, spans
from asap.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from scheduler_svc.requests import RankResultItem, ScheduledRequest

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0


class _RankLink:
    """The Run stream to one attention rank."""

    def __init__(self, rank: int, target: str, on_down: Callable[[int, str], None]) -> None:
        self.rank = rank
        self.target = target
        self._on_down = on_down
        self.channel = grpc.aio.insecure_channel(target, options=list(GRPC_OPTIONS))
        self._stub = attention_pb2_grpc.AttentionStub(self.channel)
        self._waiting: dict[int, asyncio.Future[attention_pb2.BatchResult]] = {}
        self._outbox: asyncio.Queue[attention_pb2.BatchAssignment | None] | None = None
        self._receiver: asyncio.Task[None] | None = None

    def _ensure_stream(self) -> asyncio.Queue[attention_pb2.BatchAssignment | None]:
        if self._outbox is not None and self._receiver is not None and not self._receiver.done():
            return self._outbox
        outbox: asyncio.Queue[attention_pb2.BatchAssignment | None] = asyncio.Queue()

        async def assignments() -> AsyncIterator[attention_pb2.BatchAssignment]:
            while (item := await outbox.get()) is not None:
                yield item

        call = self._stub.Run(assignments())
        self._outbox = outbox
        self._receiver = asyncio.create_task(self._receive(call, outbox), name=f"rank-rx-{self.rank}")
        return outbox

    async def _receive(
        self,
        call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
        outbox: asyncio.Queue[attention_pb2.BatchAssignment | None],
    ) -> None:
        reason = "stream closed by the attention rank"
        try:
            async for result in call:
                future = self._waiting.pop(result.batch_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except grpc.RpcError as exc:
            reason = error_from_rpc(exc).message
        finally:
            if self._outbox is outbox:
                self._outbox = None
            waiting, self._waiting = self._waiting, {}
            error = Unavailable(f"attention rank {self.rank} at {self.target}: {reason}")
            for future in waiting.values():
                if not future.done():
                    future.set_exception(error)
            call.cancel()
            if waiting:
                self._on_down(self.rank, error.message)

    async def run(self, assignment: attention_pb2.BatchAssignment) -> attention_pb2.BatchResult:
        outbox = self._ensure_stream()
        future: asyncio.Future[attention_pb2.BatchResult] = asyncio.get_running_loop().create_future()
        self._waiting[assignment.batch_id] = future
        outbox.put_nowait(assignment)
        try:
            return await future
        finally:
            self._waiting.pop(assignment.batch_id, None)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        return (await check_health_async(self.channel, timeout_s=timeout_s))[0]

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        await self.channel.close()


def _item_or_error(prompt: attention_pb2.PromptResult) -> RankResultItem | AsapError:
    if prompt.HasField("error"):
        return error_from_wire(prompt.error)
    return RankResultItem(
        first_token_id=prompt.first_token_id,
        first_token_logprob=prompt.first_token_logprob,
        top_logprobs=[(t.token_id, t.logprob) for t in prompt.top_logprobs],
        prompt_tokens=prompt.prompt_tokens,
    )


class GrpcRankClient:
    """Runs scheduler batches on attention ranks. ``on_down``/``on_up`` report rank health changes."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        on_down: Callable[[int, str], None],
        on_up: Callable[[int], None],
        mode: str = "async",
    ) -> None:
        self.targets = list(targets)
        self.mode = mode
        """Scheduling mode, recorded on ``scheduler.batch`` spans."""
        self._on_up = on_up
        self._down: set[int] = set()

        def down(rank: int, reason: str) -> None:
            if rank not in self._down:
                self._down.add(rank)
                logger.warning("attention rank %d is down: %s", rank, reason)
                on_down(rank, reason)

        self._report_down = down
        self.links = [_RankLink(rank, target, down) for rank, target in enumerate(targets)]
        self._monitor: asyncio.Task[None] | None = None

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until every attention rank answers SERVING; ``Unavailable`` names the ones that do not."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        pending = set(range(len(self.links)))
        while pending:
            ready = await asyncio.gather(*(self.links[r].healthy() for r in sorted(pending)))
            pending -= {r for r, ok in zip(sorted(pending), ready, strict=True) if ok}
            if pending and asyncio.get_running_loop().time() > deadline:
                names = ", ".join(f"{r} ({self.targets[r]})" for r in sorted(pending))
                raise Unavailable(f"attention ranks not SERVING after {timeout_s:.0f}s: {names}")
            if pending:
                await asyncio.sleep(0.2)

    def start_monitor(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="rank-health-monitor")

    async def _watch(self) -> None:
        """Every second: a rank that stops answering SERVING goes down, one that answers again comes up."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            states = await asyncio.gather(*(link.healthy() for link in self.links))
            for rank, healthy in enumerate(states):
                if healthy and rank in self._down:
                    self._down.discard(rank)
                    logger.info("attention rank %d is back", rank)
                    self._on_up(rank)
                elif not healthy:
                    self._report_down(rank, "health check failed")

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        step: int = 0,
        participants: int = 0,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> Sequence[RankResultItem | AsapError | None]:
        spans = chunks if chunks is not None else [(0, r.prompt_tokens) for r in requests]
        assignment = attention_pb2.BatchAssignment(
            batch_id=batch_id,
            step=step,
            sync_participants=participants,
            drop_caches=list(drop),
            prompts=[
                attention_pb2.PromptInput(
                    request_id=r.request_id,
                    token_ids=r.token_ids[start:end],
                    cached_tokens=start,
                    more_chunks=end < r.prompt_tokens,
                    sampling=common_pb2.SamplingOptions(
                        temperature=r.temperature, seed=r.seed or 0, top_logprobs=r.top_logprobs
                    ),
                    trace=common_pb2.TraceContext(traceparent=r.traceparent, tracestate=r.tracestate),
                )
                for r, (start, end) in zip(requests, spans, strict=True)
            ],
        )
        # Calibration probes carry no request context and are not traced.
        if setup.TRACING_ENABLED and (not requests or any(r.traceparent for r in requests)):
            result = await self._run_traced(rank, assignment, requests, step)
        else:
            result = await self.links[rank].run(assignment)
        if result.HasField("error"):
            error = error_from_wire(result.error)
            return [error] * len(requests)
        if len(result.results) != len(requests):
            raise InternalError(
                f"attention rank {rank} answered {len(result.results)} of {len(requests)} prompts"
            )
        return [None if p.partial and not p.HasField("error") else _item_or_error(p) for p in result.results]

    async def _run_traced(
        self,
        rank: int,
        assignment: attention_pb2.BatchAssignment,
        requests: Sequence[ScheduledRequest],
        step: int,
    ) -> attention_pb2.BatchResult:
        """Run ``assignment`` inside a ``scheduler.batch`` span: a trace of its own, linked to every
        request's ``scheduler.request`` span, its context sent along in ``assignment.trace``."""
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            spans.REQUEST_IDS: [r.request_id for r in requests],
            spans.RANK: rank,
            spans.TOKENS: sum(len(p.token_ids) for p in assignment.prompts),
            spans.MODE: self.mode,
        }
        if step:
            attributes[spans.STEP] = step
        span = setup.get_tracer().start_span(
            spans.SCHEDULER_BATCH,
            context=Context(),
            kind=SpanKind.CLIENT,
            links=spans.links_from(p.trace for p in assignment.prompts),
            attributes=attributes,
        )
        traceparent, tracestate = spans.inject(spans.context_of(span))
        assignment.trace.traceparent, assignment.trace.tracestate = traceparent, tracestate
        try:
            result = await self.links[rank].run(assignment)
            if result.HasField("error"):
                spans.set_error(span, result.error.message)
            return result
        except BaseException as exc:
            spans.set_error(span, getattr(exc, "message", type(exc).__name__))
            raise
        finally:
            span.end()

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await asyncio.gather(*(link.close() for link in self.links))
