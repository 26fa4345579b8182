"""Transport from an attention rank to the expert ranks: one ``ExpertLink`` (a gRPC stream and its data
plane, see ``attention_svc.expert_link``) per expert rank, sharing one codec thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from asap.dataplane.direct import DirectLink
from asap.dataplane.fast import FastOptions
from asap.dataplane.plane import ExchangeResult
from asap.devices import use_own_stream
from asap.model.placement import RankDispatch
from asap.rpc.tls import TlsConfig
from asap.syncstep import SyncStep
from asap.v1 import expert_pb2
from attention_svc.expert_link import ExpertLink

if TYPE_CHECKING:
    from opentelemetry.context import Context


class GrpcExpertTransport:
    """``ExpertTransport`` over gRPC: one ``ExpertLink`` per expert rank, each with its data plane."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        attention_rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_chunk_bytes: int,
        link_s: Callable[[int], float] | None = None,
        data_plane: str = "grpc",
        device: str = "cpu",
        region_bytes: int | None = None,
        fast: FastOptions | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self._codec = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="attention-codec",
            initializer=use_own_stream,
            initargs=(device,),
        )
        self.links = [
            ExpertLink(
                target,
                rank,
                attention_rank=attention_rank,
                hidden_size=hidden_size,
                dtype=dtype,
                max_chunk_bytes=max_chunk_bytes,
                codec=self._codec,
                link_s=link_s,
                data_plane=data_plane,
                device=device,
                region_bytes=region_bytes,
                fast=fast,
                tls=tls,
            )
            for rank, target in enumerate(targets)
        ]

    async def infos(self, timeout_s: float) -> list[expert_pb2.ExpertInfo]:
        return list(await asyncio.gather(*(link.info(timeout_s) for link in self.links)))

    async def exchange(
        self,
        rank: int,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        sync: SyncStep | None = None,
        trace: Context | None = None,
    ) -> ExchangeResult:
        return await self.links[rank].exchange(micro_batch, layer, dispatch, sync=sync, trace=trace)

    def direct_links(self, top_k: int) -> list[DirectLink] | None:
        """Every link's hot path for one batch (``asap.dataplane.direct``), in expert-rank order, or None
        unless every link's plane has one (the batch then uses ``exchange``). On the event loop."""
        links = []
        for link in self.links:
            direct = link.direct(top_k)
            if direct is None:
                return None
            links.append(direct)
        return links

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
        self._codec.shutdown(wait=False, cancel_futures=True)
