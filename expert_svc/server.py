"""gRPC glue of an expert rank: the ``asap.v1.Expert`` servicer and the service lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from asap.dataplane.cuda_ipc import CudaAttachments, visible_gpu_uuids
from asap.dataplane.select import expert_planes
from asap.dataplane.shm import ShmAttachments
from asap.devices import use_own_stream
from asap.emulation import DeviceProfile, EmulatedExpertPart, parse_compute
from asap.emulation.costs import transfer_s
from asap.emulation.loading import PartSource
from asap.errors import AsapError, InternalError
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.resolve import WeightSource
from asap.rpc.server import ServiceHandle, bound_address, create_server, run_service
from asap.rpc.streams import cancel_all, relay
from asap.telemetry import setup, spans
from asap.v1 import expert_pb2, expert_pb2_grpc
from asap.wire import chunks, codec
from expert_svc.barrier import StepBarrier
from expert_svc.config import ExpertServiceConfig
from expert_svc.core import ExpertExecutor, ExpertResult
from expert_svc.regions import StreamRegions
from expert_svc.tracing import ChunkTrace

logger = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """Adapts ``Expert.Exchange`` streams to the executor; one stream per attention rank."""

    def __init__(
        self,
        executor: ExpertExecutor,
        rank: int,
        device: str,
        *,
        profile: DeviceProfile | None = None,
        shm: bool = False,
        cuda_ipc: bool = False,
    ) -> None:
        self.executor = executor
        self.barrier = StepBarrier()
        self.profile = profile
        """Emulated compute: chunks carry shapes only, and sending a result is charged at the link speed."""
        self.shape_only = profile is not None
        self.overlap = True
        """expert-overlap: receive, compute and send of different chunks proceed concurrently."""
        self._serial = asyncio.Lock()
        self.rank = rank
        self.device = device
        part = executor.part
        self._cfg = part.config
        self._dtype = part.dtype
        # Encoding results (one bytes copy each, or the write into a region) runs off the event loop and
        # off the compute thread, on its own CUDA stream.
        self._codec = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="expert-codec", initializer=use_own_stream, initargs=(device,)
        )
        self.shm = ShmAttachments() if shm else None
        """Shared-memory data plane: regions of the attention ranks, attached on first reference (hidden
        rows are copied out once on decode); results are written back over the rows."""
        self.cuda_ipc = cuda_ipc
        """CUDA IPC data plane: each stream maps the regions its attention rank announces."""
        self.gpu_uuids = visible_gpu_uuids() if cuda_ipc else []

    def close(self) -> None:
        self._codec.shutdown(wait=False, cancel_futures=True)
        if self.shm is not None:
            self.shm.close()

    def _transfer_s(self, rows: int) -> float:
        """Emulated link time of a combine result of ``rows`` rows."""
        if self.profile is None:
            return 0.0
        nbytes = rows * self._cfg.hidden_size * self._dtype.itemsize
        return transfer_s(nbytes, self.profile)

    async def Info(
        self, request: expert_pb2.ExpertInfoRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.ExpertInfo:
        hosted = list(self.executor.part.hosted)
        return expert_pb2.ExpertInfo(
            rank=self.rank,
            model_type=self._cfg.model_type,
            hidden_size=self._cfg.hidden_size,
            num_layers=self._cfg.num_layers,
            num_experts=self._cfg.num_experts,
            dtype=codec.dtype_to_proto(self._dtype),  # type: ignore[arg-type]
            layers=[
                expert_pb2.LayerExperts(layer=layer, expert_ids=hosted) for layer in self._cfg.moe_layer_ids
            ],
            device=self.device,
            shm_data_plane=self.shm is not None,
            cuda_ipc_data_plane=self.cuda_ipc,
            gpu_uuids=self.gpu_uuids,
        )

    async def Exchange(
        self, request_iterator: AsyncIterator[expert_pb2.DispatchChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.CombineChunk]:
        outbound: asyncio.Queue[expert_pb2.CombineChunk | None] = asyncio.Queue()
        replies: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        regions = StreamRegions(self.shm, CudaAttachments() if self.cuda_ipc else None)

        async def reply(
            dispatch: chunks.Dispatch,
            future: asyncio.Future[ExpertResult] | None,
            trace: ChunkTrace | None,
        ) -> None:
            locked = False
            try:
                try:
                    barrier_ns = 0
                    if future is None:  # sync mode: wait for the other attention ranks, then compute together
                        barrier_ns = await self.barrier.wait(
                            step=dispatch.step,
                            layer=dispatch.layer,
                            participants=dispatch.sync_participants,
                            attention_rank=dispatch.attention_rank,
                            rows=dispatch.rows,
                            total_rows=dispatch.total_rows,
                        )
                        if trace is not None:
                            trace.barrier_done()
                        if not self.overlap:
                            await self._serial.acquire()
                            locked = True
                        if dispatch.rows == 0:
                            future = loop.create_future()
                            future.set_result(ExpertResult(dispatch.hidden, 0, 0))
                        else:
                            future = await self.executor.submit(
                                dispatch.layer, dispatch.hidden, dispatch.expert_ids, dispatch.weights
                            )
                    result = await future
                    if trace is not None:
                        trace.computed(result)
                    msg = await loop.run_in_executor(
                        self._codec, regions.answer, dispatch, result, barrier_ns
                    )
                except AsapError as exc:
                    msg = _error_reply(
                        dispatch.micro_batch, dispatch.layer, dispatch.row_offset, dispatch.total_rows, exc
                    )
                    trace = None
                if self.profile is not None and dispatch.rows:
                    await asyncio.sleep(self._transfer_s(dispatch.rows))
                await outbound.put(msg)
            finally:
                if locked:
                    self._serial.release()
            if trace is not None:
                trace.sent()

        async def read() -> None:
            try:
                await read_all()
            except asyncio.CancelledError:
                await cancel_all(replies)  # the attention rank went away: its chunks are abandoned
                raise

        async def read_all() -> None:
            async for msg in request_iterator:
                # expert-overlap off: one chunk at a time across all streams, received, computed and sent
                # before the next is read (sync chunks take the lock after their barrier).
                async with self._serial if not self.overlap else contextlib.nullcontext():
                    try:
                        if msg.HasField("cuda_region"):
                            regions.announce(msg.cuda_region)
                        dispatch = chunks.decode_dispatch(
                            msg,
                            hidden_size=self._cfg.hidden_size,
                            dtype=self._dtype,
                            num_layers=self._cfg.num_layers,
                            num_experts=self._cfg.num_experts,
                            top_k=self._cfg.top_k,
                            allow_shape_only=self.shape_only,
                            refs=regions.decode if regions.enabled else None,
                        )
                        trace = ChunkTrace.start(dispatch) if setup.TRACING_ENABLED else None
                        if dispatch.sync_participants:
                            self.executor.validate(dispatch.layer, dispatch.expert_ids)
                            future = None  # queued after the step barrier
                        else:
                            future = await self.executor.submit(
                                dispatch.layer, dispatch.hidden, dispatch.expert_ids, dispatch.weights
                            )
                    except AsapError as exc:
                        # A malformed chunk is answered with an error for that chunk; the stream goes on.
                        logger.warning(
                            "rejected chunk mb=%d layer=%d: %s", msg.micro_batch, msg.layer, exc.message
                        )
                        await outbound.put(
                            _error_reply(msg.micro_batch, msg.layer, msg.row_offset, msg.total_rows, exc)
                        )
                        continue
                    if not self.overlap and future is not None:
                        await reply(dispatch, future, trace)
                        continue
                task = asyncio.create_task(reply(dispatch, future, trace))
                replies.add(task)
                task.add_done_callback(replies.discard)
            if replies:
                await asyncio.gather(*replies)
            await outbound.put(None)

        try:
            async for item in relay(lambda _: read(), name="expert-stream-reader", outbound=outbound):
                yield item
        finally:
            regions.close()


def _error_reply(
    micro_batch: int, layer: int, row_offset: int, total_rows: int, exc: AsapError
) -> expert_pb2.CombineChunk:
    return chunks.error_combine(micro_batch, layer, row_offset, total_rows, exc.code, exc.message)


def build_executor(config: ExpertServiceConfig) -> ExpertExecutor:
    """Load this rank's experts (only their tensors are read) and wrap them in an executor.

    With emulated compute nothing is read but config.json: the part sleeps for the modeled time.
    """
    source = PartSource.of(config.model, config.dtype, config.compute)
    model_config, dtype = source.config, source.dtype
    placement = ExpertPlacement(model_config.num_experts, config.num_ranks)
    expert_ids = placement.experts_of(config.rank)

    def emulated(profile: DeviceProfile) -> ExpertPart:
        logger.info("expert rank %d emulates experts %s on %s", config.rank, list(expert_ids), profile.name)
        return EmulatedExpertPart(model_config, expert_ids, profile, dtype=dtype)

    def real(reader: WeightSource) -> ExpertPart:
        part = ExpertPart.from_source(reader, model_config, expert_ids, dtype=dtype, device=config.device)
        logger.info(
            "expert rank %d/%d loaded experts %s (%d tensors, %.1f MiB read)",
            config.rank,
            config.num_ranks,
            list(expert_ids),
            len(reader.tensors_read),
            reader.bytes_read / 2**20,
        )
        return part

    part = source.load(device=config.device, emulated=emulated, real=real)
    part.layer_agnostic = "layer-agnostic" in config.optimizations
    return ExpertExecutor(part, queue_depth=config.queue_depth, max_merge_rows=config.max_merge_rows)


async def warm_up(executor: ExpertExecutor) -> None:
    """Two chunks per MoE layer, queued together so they are merged into one computation: the first
    real chunks then pay no first-call costs, of the single or of the merged path (on meta tensors the
    first ``torch.cat`` costs about a second)."""
    part = executor.part
    hidden = torch.zeros(1, part.config.hidden_size, dtype=part.dtype, device=part.device)  # [1, H]
    ids = torch.full((1, part.config.top_k), -1, dtype=torch.int32)
    ids[0, 0] = part.hosted[0]
    weights = torch.zeros(1, part.config.top_k, dtype=torch.float32)
    for layer in part.config.moe_layer_ids:
        futures = [await executor.submit(layer, hidden, ids, weights) for _ in range(2)]
        await asyncio.gather(*futures)
    started = time.monotonic()
    graphs = await executor.prepare()
    if graphs:
        logger.info(
            "captured %d CUDA graphs of the expert routine in %.1fs", graphs, time.monotonic() - started
        )


class ExpertService:
    """An expert rank's whole lifecycle: load, warm up, serve, drain."""

    def __init__(self, config: ExpertServiceConfig) -> None:
        self.config = config
        self.executor: ExpertExecutor | None = None
        self.servicer: ExpertServicer | None = None
        self.handle: ServiceHandle | None = None
        self.profile: DeviceProfile | None = None
        self._started_ns = 0

    @property
    def address(self) -> str:
        if self.handle is None:
            raise InternalError("service not started")
        return bound_address(self.config.address, self.handle.port)

    async def start(self) -> str:
        """Load, bind, warm up, then report SERVING. Returns the bound address."""
        loop = asyncio.get_running_loop()
        self.executor = await loop.run_in_executor(None, build_executor, self.config)
        await self.executor.start()
        self.profile = parse_compute(self.config.compute)[1]
        shm, cuda_ipc = expert_planes(
            self.config.data_plane, self.config.device, emulated=self.profile is not None
        )
        self.servicer = ExpertServicer(
            self.executor,
            self.config.rank,
            self.config.device,
            profile=self.profile,
            shm=shm,
            cuda_ipc=cuda_ipc,
        )
        self.servicer.barrier.timeout_s = self.config.sync_timeout_s
        self.servicer.overlap = "expert-overlap" in self.config.optimizations
        self._started_ns = time.monotonic_ns()
        servicer = self.servicer
        self.handle = await create_server(
            self.config.address,
            lambda server: expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server),
            [SERVICE_NAME],
        )
        await warm_up(self.executor)
        await self.handle.set_serving()
        return self.address

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        if self.executor is not None and self._started_ns:
            stats = self.executor.stats
            wall = max(1, time.monotonic_ns() - self._started_ns)
            logger.info(
                "expert rank %d: %d chunks in %d calls; compute thread busy %.1f%% of %.1fs wall",
                self.config.rank,
                stats.chunks,
                stats.calls,
                100 * stats.busy_ns / wall,
                wall / 1e9,
            )
        if self.handle is not None:
            await self.handle.shutdown(grace)
            self.handle = None
        if self.executor is not None:
            await self.executor.stop()
            self.executor = None
        if self.servicer is not None:
            self.servicer.close()
            self.servicer = None

    async def drain(self) -> None:
        if self.executor is not None:
            await self.executor.drain()

    async def run_forever(self) -> None:
        await run_service(
            self,
            describe=f"expert rank {self.config.rank}",
            tracing_name=spans.expert_service(self.config.rank),
            grace_s=self.config.drain_timeout_s,
        )
