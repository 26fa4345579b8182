"""gRPC glue of the scheduler: the public ``asap.v1.Scheduler`` servicer and the service lifecycle."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from asap.errors import AsapError, InternalError, InvalidArgument
from asap.model.config import ModelConfig, load_config
from asap.model.sampling import MAX_TOP_LOGPROBS
from asap.model.tiny import resolve_model
from asap.model.tokenizer import PromptTokenizer, load_tokenizer
from asap.rpc.server import create_server
from asap.rpc.service import GrpcService
from asap.rpc.status import abort_with
from asap.rpc.streams import cancel_all, relay
from asap.telemetry import setup, spans
from asap.v1 import attention_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import SchedulerCore
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.rank_client import GrpcRankClient
from scheduler_svc.requests import RequestResult, ScheduledRequest

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclass(slots=True)
class SchedulerServiceConfig:
    """What the scheduler process needs: the model (for validation and tokenising), ranks, policy."""

    model: str = "tiny"
    attention_targets: list[str] = field(default_factory=list)
    """``host:port`` of every attention rank, in rank order."""
    host: str = "127.0.0.1"
    port: int = 50051
    core: SchedulerConfig = field(default_factory=SchedulerConfig)
    ready_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0
    calibrate: bool = True
    """Fit the attention cost model at start-up from probe batches on rank 0 (else use ``core.cost``)."""

    def __post_init__(self) -> None:
        if not self.attention_targets:
            raise InvalidArgument(
                "the scheduler needs at least one attention target (--attention HOST:PORT,...)"
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _trace_context(request: scheduler_pb2.PrefillRequest) -> tuple[str, str]:
    """(traceparent, tracestate): the caller's W3C context if it sent one, else a new trace."""
    parts = request.trace.traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return request.trace.traceparent, request.trace.tracestate
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", ""


def _start_request_spans(
    request: scheduler_pb2.PrefillRequest, scheduled: ScheduledRequest, mode: str, arrival_ns: int
) -> Span:
    """Open ``scheduler.request`` (under the client's span when it sent one, else a new trace) and its
    ``scheduler.queue`` child; the request then carries the request span's context to its rank."""
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    tracer = setup.get_tracer()
    span = tracer.start_span(
        spans.SCHEDULER_REQUEST,
        context=spans.extract_from(request.trace) or Context(),
        kind=SpanKind.SERVER,
        start_time=arrival_ns,
        attributes={
            spans.REQUEST_ID: scheduled.request_id,
            spans.MODE: mode,
            spans.TOKENS: scheduled.prompt_tokens,
        },
    )
    context = spans.context_of(span)
    scheduled.queue_span = tracer.start_span(spans.SCHEDULER_QUEUE, context=context, start_time=arrival_ns)
    scheduled.traceparent, scheduled.tracestate = spans.inject(context)
    return span


def _mark_failed(span: Span, exc: BaseException) -> None:
    spans.set_error(span, exc.message if isinstance(exc, AsapError) else type(exc).__name__)


class PromptValidator:
    """Turns a PrefillRequest into token ids, or raises ``InvalidArgument`` saying what is wrong."""

    def __init__(self, config: ModelConfig, tokenizer: PromptTokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def token_ids(self, request: scheduler_pb2.PrefillRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer.json: send token ids instead of text")
            if not request.text:
                raise InvalidArgument("empty prompt")
            ids = self.tokenizer.encode(request.text)
        elif which == "tokens":
            ids = list(request.tokens.ids)
        else:
            raise InvalidArgument("a request needs a prompt: tokens or text")
        if not ids:
            raise InvalidArgument("empty prompt")
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} outside the vocabulary [0, {vocab})")
        limit = self.config.max_position_embeddings
        if len(ids) > limit:
            raise InvalidArgument(f"prompt of {len(ids)} tokens exceeds the model's maximum of {limit}")
        sampling = request.sampling
        if not sampling.temperature >= 0:
            raise InvalidArgument(f"temperature must be >= 0, got {sampling.temperature}")
        if sampling.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {sampling.top_logprobs}")
        return ids


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, core: SchedulerCore, validator: PromptValidator, config: SchedulerServiceConfig
    ) -> None:
        self.core = core
        self.validator = validator
        self.config = config

    def _scheduled(self, request: scheduler_pb2.PrefillRequest, timeout_s: float | None) -> ScheduledRequest:
        arrival = time.monotonic()
        ids = self.validator.token_ids(request)
        traceparent, tracestate = _trace_context(request)
        loop = asyncio.get_running_loop()
        return ScheduledRequest(
            request_id=request.request_id or f"req-{secrets.token_hex(8)}",
            token_ids=ids,
            temperature=request.sampling.temperature,
            seed=request.sampling.seed or None,
            top_logprobs=request.sampling.top_logprobs,
            ttft_slo_ms=float(request.ttft_slo_ms) or None,
            deadline=loop.time() + timeout_s if timeout_s is not None else None,
            arrival=arrival,
            traceparent=traceparent,
            tracestate=tracestate,
        )

    async def _prefill(
        self, request: scheduler_pb2.PrefillRequest, timeout_s: float | None
    ) -> scheduler_pb2.PrefillResponse:
        """Validate, schedule and answer one request; ``AsapError`` propagates."""
        if not setup.TRACING_ENABLED:
            scheduled = self._scheduled(request, timeout_s)
            return _response(await self.core.submit(scheduled), scheduled)
        arrival_ns = time.time_ns()
        scheduled = self._scheduled(request, timeout_s)
        span = _start_request_spans(request, scheduled, self.config.core.mode, arrival_ns)
        try:
            return _response(await self.core.submit(scheduled), scheduled)
        except BaseException as exc:
            _mark_failed(span, exc)
            raise
        finally:
            scheduled.end_queue_span()
            span.end()

    async def Prefill(
        self, request: scheduler_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.PrefillResponse:
        try:
            return await self._prefill(request, context.time_remaining())
        except AsapError as exc:
            await abort_with(context, exc)
            raise InternalError("unreachable: abort returned") from exc

    async def PrefillStream(
        self, request_iterator: AsyncIterator[scheduler_pb2.PrefillRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.PrefillResponse]:
        async def produce(outbound: asyncio.Queue[scheduler_pb2.PrefillResponse | None]) -> None:
            tasks: set[asyncio.Task[None]] = set()

            async def one(request: scheduler_pb2.PrefillRequest) -> None:
                timeout = request.timeout_ms / 1e3 if request.timeout_ms else None
                try:
                    response = await self._prefill(request, timeout)
                except AsapError as exc:
                    response = scheduler_pb2.PrefillResponse(
                        request_id=request.request_id,
                        error=common_pb2.Error(code=exc.code, message=exc.message),
                    )
                await outbound.put(response)

            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                await outbound.put(None)
            except asyncio.CancelledError:
                await cancel_all(tasks)  # the client went away: its requests leave the queues
                raise

        async for response in relay(produce, name="prefill-stream-reader"):
            yield response

    async def GetClusterState(
        self, request: scheduler_pb2.ClusterStateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ClusterState:
        snapshot = self.core.state()
        cfg = self.validator.config
        return scheduler_pb2.ClusterState(
            mode=snapshot.mode,
            model_type=cfg.model_type,
            model=self.config.model,
            attention_ranks=[
                scheduler_pb2.AttentionRankState(
                    rank=r.rank,
                    target=self.config.attention_targets[r.rank],
                    healthy=r.healthy,
                    queued_requests=r.queued_requests,
                    queued_tokens=r.queued_tokens,
                    running_batches=r.running_batches,
                    predicted_load_ms=r.predicted_load_ms,
                )
                for r in snapshot.ranks
            ],
            pending_requests=snapshot.pending_requests,
            completed_requests=snapshot.completed,
            failed_requests=snapshot.failed,
            vocab_size=cfg.vocab_size,
            max_prompt_tokens=cfg.max_position_embeddings,
        )


def _response(result: RequestResult, scheduled: ScheduledRequest) -> scheduler_pb2.PrefillResponse:
    return scheduler_pb2.PrefillResponse(
        request_id=result.request_id,
        first_token_id=result.first_token_id,
        first_token_logprob=result.first_token_logprob,
        top_logprobs=[attention_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in result.top_logprobs],
        prompt_tokens=result.prompt_tokens,
        queue_ms=result.queue_ms,
        ttft_ms=result.ttft_ms,
        attention_rank=result.attention_rank,
        trace_id=scheduled.traceparent.split("-")[1],
    )


CALIBRATION_LENGTHS = (8, 256, 1024, 2048, 4096, 8192, 16384)
"""Probe prompt lengths (clipped to the model maximum): long enough to see the quadratic attention term."""
CALIBRATION_BATCH_IDS = 1 << 48  # far above the core's batch ids


async def calibrate_cost_model(
    ranks: GrpcRankClient, config: ModelConfig, repeats: int = 2
) -> AttentionCostModel:
    """Time probe batches of one prompt of several lengths on attention rank 0 and fit ``a·n + b·n² + c``.

    The measured time is the whole batch (attention, expert round trips, sampling), which is what
    placement needs to predict. Falls back to the default model if the probes fail.
    """
    lengths = sorted({min(n, config.max_position_embeddings) for n in CALIBRATION_LENGTHS})
    samples: list[tuple[list[int], float]] = []
    try:
        for i in range(repeats + 1):
            for n in lengths if i > 0 else [n for n in lengths if n <= 1024]:  # warm-up: short ones
                probe = ScheduledRequest(
                    request_id=f"calibrate-{i}-{n}",
                    token_ids=[t % min(256, config.vocab_size) for t in range(n)],
                )
                started = time.perf_counter()
                outcome = await ranks.run_batch(0, CALIBRATION_BATCH_IDS + i * 10_000 + n, [probe])
                if isinstance(outcome[0], AsapError):
                    raise outcome[0]
                if i > 0:  # the first round warms caches up
                    samples.append(([n], (time.perf_counter() - started) * 1e3))
        cost = AttentionCostModel.fit(samples)
    except AsapError as exc:
        logger.warning("cost model calibration failed (%s); using defaults", exc.message)
        return AttentionCostModel()
    logger.info(
        "calibrated attention cost: a=%.4g ms/token b=%.4g ms/token^2 c=%.3g ms",
        cost.a_ms,
        cost.b_ms,
        cost.c_ms,
    )
    return cost


class SchedulerService(GrpcService):
    """The scheduler's lifecycle: wait for the attention ranks, serve, drain on SIGTERM."""

    def __init__(self, config: SchedulerServiceConfig) -> None:
        super().__init__(config, describe="scheduler", tracing_name=spans.SCHEDULER_SERVICE)
        self.config = config
        self.core: SchedulerCore | None = None
        self.ranks: GrpcRankClient | None = None

    async def start(self) -> str:
        model_dir = resolve_model(self.config.model)
        validator = PromptValidator(load_config(model_dir), load_tokenizer(model_dir))
        core_ref: list[SchedulerCore] = []
        self.ranks = GrpcRankClient(
            self.config.attention_targets,
            mode=self.config.core.mode,
            on_down=lambda rank, reason: core_ref[0].mark_rank_down(rank, reason),
            on_up=lambda rank: core_ref[0].mark_rank_up(rank),
        )
        self.core = SchedulerCore(self.config.core, len(self.config.attention_targets), self.ranks)
        core_ref.append(self.core)
        servicer = SchedulerServicer(self.core, validator, self.config)
        self.handle = await create_server(
            self.config.address,
            lambda server: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server),
            [SERVICE_NAME],
        )
        await self.ranks.wait_ready(self.config.ready_timeout_s)
        if self.config.calibrate:
            cost = await calibrate_cost_model(self.ranks, validator.config)
            self.config.core.cost = cost
        await self.core.start()
        self.ranks.start_monitor()
        await self.handle.set_serving()
        return self.address

    async def drain(self) -> None:
        if self.core is not None:
            await self.core.stop(drain_timeout_s=self.config.drain_timeout_s)

    async def shutdown(self, grace_s: float) -> None:
        grace = grace_s
        if self.handle is not None:
            await self.handle.set_not_serving()
        if self.core is not None:
            await self.core.stop(drain_timeout_s=grace)
            self.core = None
        if self.handle is not None:
            await self.handle.server.stop(grace)
            self.handle = None
        if self.ranks is not None:
            await self.ranks.close()
            self.ranks = None
