"""The scheduler's client of the attention ranks (a ``RankClient`` over grpc): one long-lived
``Attention.Run`` stream per attention rank (``asap.rpc.duplex.DuplexStream``: opened on demand, results
routed to their batch by batch id).

A lost stream fails the batches waiting on it with ``Unavailable`` (the core then marks the rank down);
the health monitor (``scheduler_svc.health``) probes every rank with grpc health and tells the core when
one stops or starts answering SERVING. Rank health itself is recorded in the core only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from asap.errors import AsapError, InternalError, Unavailable
from asap.faultbound import fault_bound_s, probe_timeout_s
from asap.rpc.channels import aio_channel
from asap.rpc.duplex import DuplexStream, StreamCall
from asap.rpc.health import check_health_async
from asap.rpc.status import error_from_wire
from asap.rpc.tls import TlsConfig
from asap.syncstep import SyncStep
from asap.telemetry import setup, spans
from asap.v1 import attention_pb2, attention_pb2_grpc, common_pb2
from scheduler_svc.health import RankHealth, watch_ranks
from scheduler_svc.requests import FailedBatch, RankResultItem, ScheduledRequest

logger = logging.getLogger(__name__)

RunCall = Callable[[AsyncIterator[attention_pb2.BatchAssignment]], StreamCall[attention_pb2.BatchResult]]
"""Opens one ``Attention.Run`` stream (a stub's method, or an in-process stand-in)."""


class _AttentionLink:
    """The channel to one attention rank: its ``Run`` stream, results matched to batches by batch id."""

    def __init__(
        self, rank: int, target: str, tls: TlsConfig | None = None, open_call: RunCall | None = None
    ) -> None:
        self.rank = rank
        self.target = target
        self.channel: grpc.aio.Channel | None = None
        if open_call is None:
            self.channel = aio_channel(target, tls)
            open_call = attention_pb2_grpc.AttentionStub(self.channel).Run
        self.stream: DuplexStream[attention_pb2.BatchAssignment, attention_pb2.BatchResult, int] = (
            DuplexStream(
                open_call,
                key_of=lambda result: int(result.batch_id),
                peer=f"attention rank {rank} at {target}",
                name=f"rank-rx-{rank}",
            )
        )

    async def run(self, assignment: attention_pb2.BatchAssignment) -> attention_pb2.BatchResult:
        """Send ``assignment`` and await its result; ``Unavailable`` if the stream breaks meanwhile."""
        return await self.stream.request(assignment.batch_id, assignment)

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        if self.channel is None:  # an in-process rank is up while its process is
            return True
        return (await check_health_async(self.channel, timeout_s=timeout_s))[0]

    async def close(self) -> None:
        await self.stream.close()
        if self.channel is not None:
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


class AttentionClient:
    """Runs scheduler batches on the attention ranks, and probes their health for the monitor."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        mode: str = "async",
        tls: TlsConfig | None = None,
        open_calls: Sequence[RunCall] | None = None,
    ) -> None:
        """``open_calls``: per rank, what opens its ``Run`` stream instead of a gRPC channel to its target
        (``asap simulate`` passes the in-process servicers' ``Run``); ``tls``: the channels' mutual TLS."""
        self.targets = list(targets)
        self.mode = mode
        """Scheduling mode, recorded on ``scheduler.batch`` spans."""
        opens: Sequence[RunCall | None] = open_calls if open_calls is not None else [None] * len(targets)
        if len(opens) != len(self.targets):
            raise InternalError(f"{len(opens)} stream openers for {len(self.targets)} attention ranks")
        self.links = [
            _AttentionLink(rank, target, tls, open_call)
            for rank, (target, open_call) in enumerate(zip(self.targets, opens, strict=True))
        ]
        self.probe_timeout_s = probe_timeout_s(fault_bound_s())
        self._monitor: asyncio.Task[None] | None = None

    async def probe(self, rank: int) -> bool:
        """Whether ``rank`` answers SERVING to a grpc health check, within the fault bound's share
        (``asap.faultbound``: a frozen rank is taken down, and its batches failed, inside the bound)."""
        return await self.links[rank].healthy(self.probe_timeout_s)

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

    def start_monitor(self, health: RankHealth) -> None:
        """Probe every rank each second and record changes in ``health`` until ``close``."""
        self._monitor = asyncio.create_task(
            watch_ranks(self.probe, len(self.links), health), name="rank-health-monitor"
        )

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> Sequence[RankResultItem | AsapError | None]:
        spans = chunks if chunks is not None else [(0, r.prompt_tokens) for r in requests]
        step, participants = SyncStep.to_wire(sync)
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
            result = await self._run_traced(rank, assignment, requests, sync)
        else:
            result = await self.links[rank].run(assignment)
        if result.HasField("error"):
            error = error_from_wire(result.error)
            return FailedBatch([error] * len(requests))
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
        sync: SyncStep | None,
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
        if sync is not None:
            attributes[spans.STEP] = sync.step
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
