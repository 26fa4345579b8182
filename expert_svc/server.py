"""gRPC glue of an expert rank: the ``asap.v1.Expert`` servicer and the service lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import torch

from asap.dataplane.cuda_ipc import visible_gpu_uuids
from asap.dataplane.nixl_select import expert_accepts_nixl
from asap.dataplane.select import expert_accepts_fast, expert_planes
from asap.dataplane.shm import ShmAttachments
from asap.devices import use_own_stream
from asap.emulation import parse_compute
from asap.rpc.server import create_server
from asap.rpc.service import GrpcService
from asap.rpc.streams import relay
from asap.telemetry import spans
from asap.v1 import expert_pb2, expert_pb2_grpc
from asap.wire import codec
from expert_svc.build import build_executor, warm_up
from expert_svc.config import ExpertServiceConfig
from expert_svc.core import ExpertExecutor
from expert_svc.exchange import ExpertExchange, Outbound
from expert_svc.fastlane import FastLane
from expert_svc.gpu_fastlane import GpuFastLane
from expert_svc.nixl_lane import NixlLane

if TYPE_CHECKING:
    from asap.metrics.export import Collector

logger = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """Adapts ``Expert.Exchange`` streams (one per attention rank) to exchange sessions, and answers
    ``Info``."""

    def __init__(self, exchange: ExpertExchange, rank: int, device: str) -> None:
        self.exchange = exchange
        self.rank = rank
        self.device = device
        self.gpu_uuids = visible_gpu_uuids() if exchange.cuda_ipc else []

    async def Info(
        self, request: expert_pb2.ExpertInfoRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.ExpertInfo:
        part = self.exchange.executor.part
        cfg = part.config
        hosted = list(part.hosted)
        return expert_pb2.ExpertInfo(
            rank=self.rank,
            model_type=cfg.model_type,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_experts=cfg.num_experts,
            dtype=codec.dtype_to_proto(part.dtype),  # type: ignore[arg-type]
            layers=[expert_pb2.LayerExperts(layer=layer, expert_ids=hosted) for layer in cfg.moe_layer_ids],
            device=self.device,
            shm_data_plane=self.exchange.shm is not None,
            cuda_ipc_data_plane=self.exchange.cuda_ipc,
            gpu_uuids=self.gpu_uuids,
            fast_data_plane=self.exchange.fast is not None,
            nixl_data_plane=self.exchange.nixl is not None,
        )

    async def Exchange(
        self, request_iterator: AsyncIterator[expert_pb2.DispatchChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[expert_pb2.CombineChunk]:
        session = self.exchange.session()
        outbound: Outbound = asyncio.Queue()
        try:
            async for item in relay(
                lambda queue: session.run(request_iterator, queue),
                name="expert-stream-reader",
                outbound=outbound,
            ):
                yield item
        finally:
            session.close()


class ExpertService(GrpcService):
    """An expert rank's whole lifecycle: load, warm up, serve, drain."""

    def __init__(self, config: ExpertServiceConfig) -> None:
        super().__init__(
            config,
            describe=f"expert rank {config.rank}",
            tracing_name=spans.expert_service(config.rank),
        )
        self.config = config
        self.executor: ExpertExecutor | None = None
        self.exchange: ExpertExchange | None = None
        self._codec: ThreadPoolExecutor | None = None
        self._started_ns = 0

    async def start(self) -> str:
        """Load, bind, warm up, then report SERVING. Returns the bound address."""
        loop = asyncio.get_running_loop()
        config = self.config
        self.executor = await loop.run_in_executor(None, build_executor, config)
        await self.executor.start()
        profile = parse_compute(config.compute)[1]
        shm, cuda_ipc = expert_planes(config.data_plane, config.device, emulated=profile is not None)
        self._codec = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="expert-codec",
            initializer=use_own_stream,
            initargs=(config.device,),
        )
        nixl = None
        if expert_accepts_nixl(config.data_plane, emulated=profile is not None):
            lane = FastLane(self.executor, shape_only=False, max_merge_rows=config.max_merge_rows)
            nixl = NixlLane(lane, torch.device(config.device))
        self.exchange = ExpertExchange(
            self.executor,
            self._codec,
            overlap="expert-overlap" in config.optimizations,
            profile=profile,
            shm=ShmAttachments() if shm else None,
            cuda_ipc=cuda_ipc,
            fast=self._fast_lane(profile is not None),
            nixl=nixl,
        )
        self.exchange.barrier.timeout_s = config.sync_timeout_s
        self.exchange.barrier.supersede = True  # one step at a time: a newer one ends the older ones
        servicer = ExpertServicer(self.exchange, config.rank, config.device)
        self._started_ns = time.monotonic_ns()
        self.handle = await create_server(
            config.address,
            lambda server: expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server),
            [SERVICE_NAME],
            tls=config.tls,
        )
        await warm_up(self.executor)
        if isinstance(self.exchange.fast, GpuFastLane):  # its kernels and flags, before SERVING
            await self.executor.on_compute_thread(self.exchange.fast.warm)
        self.start_metrics(self._collectors)
        await self.handle.set_serving()
        return self.address

    def _collectors(self) -> Sequence[Collector]:
        from expert_svc.metrics import expert_collectors  # prometheus_client: only with metrics on

        return expert_collectors(self)

    def _fast_lane(self, emulated: bool) -> FastLane | None:
        """The fast plane's expert side: host slots on CPU ranks, GPU slots and flags on CUDA ranks."""
        config = self.config
        assert self.executor is not None
        if not expert_accepts_fast(config.data_plane, config.device):
            return None
        if torch.device(config.device).type == "cuda":
            return GpuFastLane(self.executor, max_merge_rows=config.max_merge_rows)
        return FastLane(self.executor, shape_only=emulated, max_merge_rows=config.max_merge_rows)

    async def shutdown(self, grace_s: float) -> None:
        await self.stop_metrics()
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
        await self.stop_server(grace_s)
        if self.exchange is not None and self.exchange.fast is not None:
            self.exchange.fast.close()  # before the compute thread goes
        if self.exchange is not None and self.exchange.nixl is not None:
            self.exchange.nixl.close()
        if self.executor is not None:
            await self.executor.stop()
            self.executor = None
        if self._codec is not None:
            self._codec.shutdown(wait=False, cancel_futures=True)
            self._codec = None
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None

    async def drain(self) -> None:
        if self.executor is not None:
            await self.executor.drain()
