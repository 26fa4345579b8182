"""gRPC glue of an attention rank: the ``asap.v1.Attention`` servicer and the service lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from asap.dataplane.fast import FastOptions
from asap.emulation import DeviceProfile, EmulatedAttentionPart
from asap.emulation.costs import transfer_s
from asap.emulation.loading import PartSource
from asap.errors import AsapError, CheckpointError, InternalError
from asap.model.attention_part import AttentionModel, AttentionPart
from asap.model.config import ModelConfig
from asap.model.placement import ExpertPlacement
from asap.model.resolve import WeightSource
from asap.rpc.server import create_server
from asap.rpc.service import GrpcService
from asap.rpc.status import error_to_wire
from asap.rpc.streams import answer_each, relay
from asap.syncstep import SyncStep
from asap.telemetry import setup, spans
from asap.v1 import attention_pb2, attention_pb2_grpc, common_pb2, expert_pb2
from asap.warmup import (
    WARMUP_BATCH_TOKENS,
    plan_attention_warmup,
    warm_attention_kernels,
    warm_attention_rank,
)
from attention_svc.batch import AttentionStats, BatchOutcome, PromptOutcome, PromptSpec
from attention_svc.config import AttentionServiceConfig
from attention_svc.core import AttentionExecutor
from attention_svc.kvcaches import ChunkCaches
from attention_svc.transport import GrpcExpertTransport

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from asap.metrics.export import Collector

logger = logging.getLogger(__name__)

SERVICE_NAME = attention_pb2.DESCRIPTOR.services_by_name["Attention"].full_name


class AttentionServicer(attention_pb2_grpc.AttentionServicer):
    """Adapts the scheduler's ``Run`` stream to the executor: batches run concurrently, results stream
    back in completion order."""

    def __init__(self, executor: AttentionExecutor, config: AttentionServiceConfig) -> None:
        self.executor = executor
        self.config = config
        self._active: set[asyncio.Task[None]] = set()
        self.caches = ChunkCaches(executor.part.config.num_layers)

    async def drain(self) -> None:
        while self._active:
            await asyncio.gather(*list(self._active), return_exceptions=True)

    async def run_assignment(self, assignment: attention_pb2.BatchAssignment) -> attention_pb2.BatchResult:
        """Validate each prompt (a bad one fails alone), run the valid ones as one batch."""
        self.caches.drop(assignment.drop_caches)
        valid: list[PromptSpec] = []
        rejected: dict[str, PromptOutcome] = {}
        for prompt in assignment.prompts:
            try:
                valid.append(
                    self.executor.make_prompt(
                        prompt.request_id,
                        list(prompt.token_ids),
                        temperature=prompt.sampling.temperature,
                        seed=prompt.sampling.seed if prompt.sampling.seed else None,
                        top_logprobs=prompt.sampling.top_logprobs,
                        cache=self.caches.for_chunk(
                            prompt.request_id, prompt.cached_tokens, prompt.more_chunks
                        ),
                        more_chunks=prompt.more_chunks,
                    )
                )
            except AsapError as exc:
                self.caches.drop([prompt.request_id])
                rejected[prompt.request_id] = PromptOutcome(
                    prompt.request_id, len(prompt.token_ids), error=exc
                )
        span = _start_batch_span(assignment, self.config.rank) if setup.TRACING_ENABLED else None
        try:
            outcome = await self.executor.run_batch(
                valid,
                sync=SyncStep.from_wire(assignment.step, assignment.sync_participants),
                trace=spans.context_of(span) if span is not None else None,
            )
            if span is not None:
                span.set_attribute(spans.MICRO_BATCH, outcome.micro_batch)
        except Exception as exc:
            self.caches.drop(spec.request_id for spec in valid)
            error = exc if isinstance(exc, AsapError) else InternalError(str(exc))
            if isinstance(exc, AsapError):
                logger.warning("batch %d failed: %s", assignment.batch_id, error.message)
            else:
                logger.exception("batch %d failed", assignment.batch_id)
            if span is not None:
                spans.set_error(span, error.message)
            return attention_pb2.BatchResult(batch_id=assignment.batch_id, error=error_to_wire(error))
        finally:
            if span is not None:
                span.end()
        self.caches.drop(spec.request_id for spec in valid if not spec.more_chunks)
        by_id = {r.request_id: r for r in outcome.results} | rejected
        return _batch_result(assignment, outcome, by_id)

    async def Run(
        self,
        request_iterator: AsyncIterator[attention_pb2.BatchAssignment],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[attention_pb2.BatchResult]:
        async def produce(outbound: asyncio.Queue[attention_pb2.BatchResult | None]) -> None:
            # A scheduler that goes away abandons its batches.
            await answer_each(
                request_iterator,
                self.run_assignment,
                outbound,
                task_name=lambda assignment: f"batch-{assignment.batch_id}",
                also_track=self._active,
            )

        async for result in relay(produce, name="attention-stream-reader"):
            yield result


def _start_batch_span(assignment: attention_pb2.BatchAssignment, rank: int) -> Span | None:
    """``attention.batch``: a child of the scheduler's ``scheduler.batch`` (context in the assignment),
    linked to each request's span. Batches without a context (cost-model probes) are not traced."""
    from opentelemetry.trace import SpanKind

    parent = spans.extract_from(assignment.trace)
    if parent is None:
        return None
    return setup.get_tracer().start_span(
        spans.ATTENTION_BATCH,
        context=parent,
        kind=SpanKind.SERVER,
        links=spans.links_from(p.trace for p in assignment.prompts),
        attributes={
            spans.REQUEST_IDS: [p.request_id for p in assignment.prompts],
            spans.RANK: rank,
            spans.TOKENS: sum(len(p.token_ids) for p in assignment.prompts),
        },
    )


def _batch_result(
    assignment: attention_pb2.BatchAssignment, outcome: BatchOutcome, by_id: dict[str, PromptOutcome]
) -> attention_pb2.BatchResult:
    results = []
    for prompt in assignment.prompts:
        item = by_id[prompt.request_id]
        if item.partial and item.error is None:
            results.append(
                attention_pb2.PromptResult(
                    request_id=item.request_id, prompt_tokens=item.prompt_tokens, partial=True
                )
            )
            continue
        if item.error is not None or item.first is None:
            error = item.error or InternalError("no result")
            results.append(
                attention_pb2.PromptResult(
                    request_id=item.request_id, prompt_tokens=item.prompt_tokens, error=error_to_wire(error)
                )
            )
            continue
        results.append(
            attention_pb2.PromptResult(
                request_id=item.request_id,
                first_token_id=item.first.token_id,
                first_token_logprob=item.first.logprob,
                top_logprobs=[
                    common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in item.first.top_logprobs
                ],
                prompt_tokens=item.prompt_tokens,
            )
        )
    return attention_pb2.BatchResult(
        batch_id=assignment.batch_id,
        results=results,
        started_unix_nanos=outcome.started_ns,
        finished_unix_nanos=outcome.finished_ns,
        expert_wait_nanos=outcome.expert_wait_ns,
        barrier_wait_nanos=outcome.barrier_wait_ns,
    )


def placement_from_infos(config: ModelConfig, infos: list[expert_pb2.ExpertInfo]) -> ExpertPlacement:
    """Build the placement from what the expert ranks report hosting; fail fast on any mismatch."""
    experts_by_rank: list[list[int]] = []
    for rank, info in enumerate(infos):
        if info.model_type != config.model_type or info.hidden_size != config.hidden_size:
            raise CheckpointError(
                f"expert rank {rank} serves {info.model_type} hidden {info.hidden_size}, "
                f"this rank has {config.model_type} hidden {config.hidden_size}"
            )
        if info.rank != rank:
            raise CheckpointError(
                f"expert target #{rank} reports rank {info.rank}: targets must be in rank order"
            )
        layers = {entry.layer: tuple(entry.expert_ids) for entry in info.layers}
        if set(layers) != set(config.moe_layer_ids) or len(set(layers.values())) != 1:
            raise CheckpointError(f"expert rank {rank} must host the same experts on every MoE layer")
        experts_by_rank.append(list(next(iter(layers.values()))))
    return ExpertPlacement.from_assignment(experts_by_rank)


class AttentionService(GrpcService):
    """An attention rank's whole lifecycle: load, connect to the experts, warm up, serve, drain."""

    def __init__(self, config: AttentionServiceConfig) -> None:
        super().__init__(
            config,
            describe=f"attention rank {config.rank}",
            tracing_name=spans.attention_service(config.rank),
        )
        self.config = config
        self.executor: AttentionExecutor | None = None
        self.transport: GrpcExpertTransport | None = None
        self.servicer: AttentionServicer | None = None

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        source = PartSource.of(self.config.model, self.config.dtype, self.config.compute)
        model_config, dtype, profile = source.config, source.dtype, source.profile

        def emulated(profile: DeviceProfile) -> AttentionModel:
            logger.info("attention rank %d emulates %s", self.config.rank, profile.name)
            return EmulatedAttentionPart(
                model_config, profile, seed=self.config.rank, skew=self.config.route_skew, dtype=dtype
            )

        def real(reader: WeightSource) -> AttentionModel:
            part = AttentionPart.from_source(reader, model_config, dtype=dtype, device=self.config.device)
            logger.info(
                "attention rank %d loaded %d tensors (%.1f MiB)",
                self.config.rank,
                len(reader.tensors_read),
                reader.bytes_read / 2**20,
            )
            return part

        part = await loop.run_in_executor(
            None, lambda: source.load(device=self.config.device, emulated=emulated, real=real)
        )
        self.transport = GrpcExpertTransport(
            self.config.expert_targets,
            attention_rank=self.config.rank,
            hidden_size=model_config.hidden_size,
            dtype=dtype,
            max_chunk_bytes=self.config.max_chunk_bytes,
            link_s=(lambda nbytes: transfer_s(nbytes, profile)) if profile is not None else None,
            data_plane=self.config.data_plane,
            device=self.config.device,
            fast=FastOptions(self.config.fast_peer_timeout_s, self.config.fast_attach_timeout_s),
            tls=self.config.tls,
        )
        infos = await self.transport.infos(self.config.expert_connect_timeout_s)
        placement = placement_from_infos(model_config, infos)
        self.executor = AttentionExecutor(
            part, self.transport, placement, max_inflight=self.config.max_inflight_batches
        )
        self.servicer = AttentionServicer(self.executor, self.config)
        servicer = self.servicer
        self.handle = await create_server(
            self.config.address,
            lambda server: attention_pb2_grpc.add_AttentionServicer_to_server(servicer, server),
            [SERVICE_NAME],
            tls=self.config.tls,
        )
        # Warm-up: one real prompt through every layer and every expert rank it touches.
        await self.executor.run_batch([self.executor.make_prompt("warm-up", [0, 1, 2, 3])])
        if isinstance(part, AttentionPart) and part.device.type == "cuda":
            await _warm_cuda(self.executor, part, model_config)
        self.executor.stats = AttentionStats()  # count what is served, not the warm-up
        for link in self.transport.links:
            link.reset_exchange_stats()
        self.start_metrics(self._collectors)
        await self.handle.set_serving()
        return self.address

    def _collectors(self) -> Sequence[Collector]:
        from attention_svc.metrics import attention_collectors  # prometheus_client: only with metrics on

        return attention_collectors(self)

    async def shutdown(self, grace_s: float) -> None:
        try:
            await self.stop_metrics()
            await self.stop_server(grace_s)
        finally:  # the links' shared-memory names and the compute thread go whatever stopping did
            if self.transport is not None:
                await self.transport.close()
                self.transport = None
            if self.executor is not None:
                self.executor.close()
                self.executor = None

    async def drain(self) -> None:
        if self.servicer is not None:
            await self.servicer.drain()


async def _warm_cuda(executor: AttentionExecutor, part: AttentionPart, model_config: ModelConfig) -> None:
    """Every attention shape and batch bucket the rank will meet, before SERVING: cuDNN builds a graph
    per new prompt length (tens of ms each), which made the first minute of serving slow."""
    started = time.monotonic()
    plan = plan_attention_warmup(model_config, max_batch_tokens=WARMUP_BATCH_TOKENS)
    shapes = await executor.on_compute_thread(warm_attention_kernels, part, plan)
    batches = await warm_attention_rank(executor, plan, model_config.vocab_size)
    logger.info(
        "warmed %d attention shapes and %d batches in %.1fs", shapes, batches, time.monotonic() - started
    )
