"""gRPC glue of the scheduler: the public ``asap.v1.Scheduler`` servicer and the service lifecycle."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from asap import clock
from asap.auth import TokenAuth
from asap.errors import AsapError, InternalError, InvalidArgument
from asap.model.config import load_config
from asap.model.resolve import resolve_model
from asap.model.tokenizer import load_tokenizer
from asap.rpc.server import bound_address, create_server
from asap.rpc.service import GrpcService
from asap.rpc.status import abort_with, error_to_wire
from asap.rpc.streams import answer_each, relay
from asap.rpc.tls import TlsConfig
from asap.telemetry import setup, spans
from asap.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.attention_client import AttentionClient
from scheduler_svc.calibration import calibrate_cost_model
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import SchedulerCore
from scheduler_svc.requests import RequestResult, ScheduledRequest
from scheduler_svc.stats import RequestStats, outcome_code
from scheduler_svc.tracing import request_spans, trace_context
from scheduler_svc.validation import PromptValidator

if TYPE_CHECKING:
    from asap.metrics.export import Collector
    from scheduler_svc.http_server import HttpFrontDoor

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
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port (0: a free one, printed); None: no metrics server."""
    calibrate: bool = True
    """Fit the attention cost model at start-up from probe batches on rank 0 (else use ``core.cost``)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP front door on ``host`` (0 = any free one); None = no HTTP."""
    served_model_name: str = ""
    """The ``model`` name HTTP requests must use (``GET /v1/models``); empty = derived from ``model``."""
    tls: TlsConfig | None = None
    """Mutual TLS on the public port and on the channels to the attention ranks; None: plaintext."""
    auth_token_file: str | None = None
    """Bearer tokens the public endpoint accepts, one per line (re-read on SIGHUP); None: no token needed."""

    def __post_init__(self) -> None:
        if not self.attention_targets:
            raise InvalidArgument(
                "the scheduler needs at least one attention target (--attention HOST:PORT,...)"
            )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, core: SchedulerCore, validator: PromptValidator, config: SchedulerServiceConfig
    ) -> None:
        self.core = core
        self.validator = validator
        self.config = config
        self.stats = RequestStats()
        """Request outcomes and times of this front door (read by ``scheduler_svc.metrics``)."""

    def _scheduled(
        self, request: scheduler_pb2.PrefillRequest, timeout_s: float | None, arrival: float
    ) -> ScheduledRequest:
        ids = self.validator.token_ids(request)
        traceparent, tracestate = trace_context(request)
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
        """Validate, schedule and answer one request; ``AsapError`` propagates. Its outcome is counted in
        ``stats`` (the metrics' request view): every front door answers through here."""
        try:
            return await self._answer(request, timeout_s)
        except BaseException as exc:
            self.stats.record_failure(outcome_code(exc))
            raise

    async def _answer(
        self, request: scheduler_pb2.PrefillRequest, timeout_s: float | None
    ) -> scheduler_pb2.PrefillResponse:
        # Arrival on the services' clock (asap.clock: virtual under `asap simulate`), which the queue and
        # TTFT times are measured from; the request's spans start at the same moment on the wall clock
        # (span timestamps are wall time) and end TTFT later (``RequestAnswered``).
        arrival = clock.monotonic()
        if not setup.TRACING_ENABLED:
            scheduled = self._scheduled(request, timeout_s, arrival)
            return _response(self._count(await self.core.submit(scheduled)), scheduled)
        arrival_ns = time.time_ns()
        scheduled = self._scheduled(request, timeout_s, arrival)
        with request_spans(request, scheduled, self.config.core.mode, arrival_ns) as answered:
            result = self._count(await self.core.submit(scheduled))
            answered.at_ttft(result.ttft_ms)
            return _response(result, scheduled)

    def _count(self, result: RequestResult) -> RequestResult:
        self.stats.record_success(result)
        return result

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
        async def answer(request: scheduler_pb2.PrefillRequest) -> scheduler_pb2.PrefillResponse:
            timeout = request.timeout_ms / 1e3 if request.timeout_ms else None
            try:
                return await self._prefill(request, timeout)
            except AsapError as exc:
                return scheduler_pb2.PrefillResponse(request_id=request.request_id, error=error_to_wire(exc))

        async def produce(outbound: asyncio.Queue[scheduler_pb2.PrefillResponse | None]) -> None:
            # A client that goes away takes its requests out of the queues.
            await answer_each(request_iterator, answer, outbound)

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
        top_logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in result.top_logprobs],
        prompt_tokens=result.prompt_tokens,
        queue_ms=result.queue_ms,
        ttft_ms=result.ttft_ms,
        attention_rank=result.attention_rank,
        trace_id=scheduled.traceparent.split("-")[1],
    )


class SchedulerService(GrpcService):
    """The scheduler's lifecycle: wait for the attention ranks, serve, drain on SIGTERM."""

    def __init__(self, config: SchedulerServiceConfig) -> None:
        super().__init__(config, describe="scheduler", tracing_name=spans.SCHEDULER_SERVICE)
        self.config = config
        self.core: SchedulerCore | None = None
        self.ranks: AttentionClient | None = None
        self.http: HttpFrontDoor | None = None
        self.serving = False
        """SERVING reported and not draining: what the HTTP ``/health`` answers with."""
        self.servicer: SchedulerServicer | None = None

    async def start(self) -> str:
        model_dir = resolve_model(self.config.model)
        validator = PromptValidator(load_config(model_dir), load_tokenizer(model_dir))
        auth = TokenAuth.from_file(self.config.auth_token_file) if self.config.auth_token_file else None
        self.ranks = AttentionClient(
            self.config.attention_targets, mode=self.config.core.mode, tls=self.config.tls
        )
        self.core = SchedulerCore(self.config.core, len(self.config.attention_targets), self.ranks)
        servicer = self.servicer = SchedulerServicer(self.core, validator, self.config)
        self.handle = await create_server(
            self.config.address,
            lambda server: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server),
            [SERVICE_NAME],
            tls=self.config.tls,
            auth=auth,
        )
        if self.config.http_port is not None:
            await self._start_http(servicer, validator, auth)
        await self.ranks.wait_ready(self.config.ready_timeout_s)
        if self.config.calibrate:
            cost = await calibrate_cost_model(
                self.ranks, validator.config, on_rank_down=self.core.mark_rank_down
            )
            self.core.set_cost_model(cost)
        await self.core.start()
        self.ranks.start_monitor(self.core)
        self.start_metrics(self._collectors)
        await self.handle.set_serving()
        self.serving = True
        return self.address

    async def _start_http(
        self, servicer: SchedulerServicer, validator: PromptValidator, auth: TokenAuth | None
    ) -> None:
        """The OpenAI front door, on the same request path as gRPC ``Prefill`` (``servicer._prefill``)."""
        from asap.openai_protocol import served_model_name
        from scheduler_svc.http_server import HTTP_READY_LINE, HttpFrontDoor
        from scheduler_svc.openai_api import CompletionWriter

        def ready() -> bool:
            return self.serving and self.core is not None and self.core.ranks.any_healthy()

        def model_info() -> tuple[int, dict[str, object]]:
            cfg = validator.config
            facts = {
                "vocab_size": cfg.vocab_size,
                "model_type": cfg.model_type,
                "mode": self.config.core.mode,
            }
            return cfg.max_position_embeddings, facts

        name = self.config.served_model_name or served_model_name(self.config.model)
        writer = CompletionWriter(name, validator.tokenizer)
        tls = self.config.tls
        self.http = HttpFrontDoor(
            servicer._prefill,
            writer,
            ready=ready,
            model_info=model_info,
            authorize=None if auth is None else auth.check,  # the gRPC door's tokens (reloaded on SIGHUP)
            ssl_context=None if tls is None else tls.server_ssl_context(),
        )
        port = await self.http.start(self.config.host, self.config.http_port or 0)
        scheme = "http" if tls is None else "https"
        print(
            HTTP_READY_LINE.format(url=f"{scheme}://{bound_address(self.config.address, port)}"), flush=True
        )

    def _collectors(self) -> Sequence[Collector]:
        from scheduler_svc.metrics import scheduler_collectors  # prometheus_client: only with metrics on

        return scheduler_collectors(self)

    async def drain(self) -> None:
        self.serving = False
        if self.core is not None:
            await self.core.stop(drain_timeout_s=self.config.drain_timeout_s)

    async def shutdown(self, grace_s: float) -> None:
        grace = grace_s
        self.serving = False
        await self.stop_metrics()
        if self.handle is not None:
            await self.handle.set_not_serving()
        if self.core is not None:
            await self.core.stop(drain_timeout_s=grace)
            self.core = None
        if self.http is not None:  # after the core: the requests it answered are written out first
            await self.http.stop()
            self.http = None
        if self.handle is not None:
            await self.handle.server.stop(grace)
            self.handle = None
        if self.ranks is not None:
            await self.ranks.close()
            self.ranks = None
