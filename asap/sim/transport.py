"""The in-process transport: the services' own gRPC handlers, called directly instead of over gRPC.

Each service's ``Run``/``Exchange`` servicer method is an async generator over a request iterator, and
each client's ``DuplexStream`` opens its stream through a callable that takes a request iterator. So the
simulator hands the client, as its opener, the servicer method itself (``ServicerCall``): messages are
the same protobufs, answered by the same handlers, routed back by the same ``DuplexStream``; only the
sockets are gone. Between attention and expert ranks the rows still travel as shape-only chunks of the
``grpc`` data plane (``StreamPlane``), which charges the modelled link time of each dispatch; the expert
side charges each result's (``ExpertExchange.transfer_s``), both as timed waits on the virtual clock.
The links without messages (``DirectPlane``, ``DirectExpertTransport``) are in ``asap.sim.direct``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from asap.dataplane.plane import ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.planes import ExchangeStream, StreamPlane
from asap.model.placement import RankDispatch
from asap.rpc.duplex import DuplexStream
from asap.sim.devices import Inline
from asap.syncstep import SyncStep
from asap.v1 import expert_pb2

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from expert_svc.server import ExpertServicer

__all__ = [
    "InProcessExpertTransport",
    "PerRankPlanes",
    "ServicerCall",
    "close_each",
    "in_process_links",
    "servicer_opener",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class ServicerCall(Generic[Resp]):
    """A servicer's streaming handler seen as a client's stream call (``asap.rpc.duplex.StreamCall``)."""

    def __init__(self, handler: AsyncIterator[Resp]) -> None:
        self._handler = handler
        self._closing: asyncio.Future[None] | None = None

    def __aiter__(self) -> AsyncIterator[Resp]:
        return self._handler

    def cancel(self) -> bool:
        """End the handler, as a cancelled RPC does (its ``finally`` blocks run)."""
        handler = self._handler
        if self._closing is not None or not isinstance(handler, AsyncGenerator):
            return False
        if getattr(handler, "ag_running", False):  # cancelled while it runs: it ends by itself
            return False
        self._closing = asyncio.ensure_future(handler.aclose())
        return True


def servicer_opener(
    method: Callable[[AsyncIterator[Req], Any], AsyncIterator[Resp]],
) -> Callable[[AsyncIterator[Req]], ServicerCall[Resp]]:
    """An opener for ``DuplexStream``: each stream is one call of the servicer's ``method`` (with no
    gRPC context: the handlers the simulator calls never read it)."""

    def open_call(requests: AsyncIterator[Req]) -> ServicerCall[Resp]:
        return ServicerCall(method(requests, None))

    return open_call


class _RankPlane(Protocol):
    def exchange(self, request: PlaneRequest) -> Awaitable[ExchangeResult]: ...


class PerRankPlanes:
    """What both simulated transports share: one plane per expert rank, an exchange goes to its rank's."""

    planes: Sequence[_RankPlane]

    def exchange(
        self,
        rank: int,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        sync: SyncStep | None = None,
        trace: Context | None = None,
    ) -> Awaitable[ExchangeResult]:
        """The rank's plane's exchange (its coroutine or future, awaited by the caller: no frame of its
        own)."""
        return self.planes[rank].exchange(PlaneRequest(micro_batch, layer, dispatch, sync))


class _Closable(Protocol):
    async def close(self) -> None: ...


async def close_each(parts: Sequence[_Closable]) -> None:
    """Close every one of ``parts``, going on past a failing one (a transport's close never fails)."""
    for part in parts:
        with contextlib.suppress(Exception):
            await part.close()


def in_process_links(
    count: int,
    *,
    attention_rank: int,
    hidden_size: int,
    dtype: torch.dtype,
    max_chunk_bytes: int,
    link_s: Callable[[int], float],
) -> list[LinkSpec]:
    """An attention rank's links to ``count`` in-process expert ranks: host memory, modelled link time."""
    return [
        LinkSpec(
            attention_rank=attention_rank,
            expert_rank=rank,
            hidden_size=hidden_size,
            dtype=dtype,
            device=torch.device("cpu"),
            max_chunk_bytes=max_chunk_bytes,
            link_s=link_s,
        )
        for rank in range(count)
    ]


class InProcessExpertTransport(PerRankPlanes):
    """An attention rank's ``ExpertTransport`` to in-process expert servicers: per expert rank one
    ``DuplexStream`` into its ``Exchange`` handler, carrying the ``grpc`` plane's shape-only chunks."""

    def __init__(
        self,
        servicers: Sequence[ExpertServicer],
        *,
        attention_rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_chunk_bytes: int,
        link_s: Callable[[int], float],
    ) -> None:
        self._codec = Inline()
        self.streams: list[ExchangeStream] = []
        self.planes: list[StreamPlane] = []
        links = in_process_links(
            len(servicers),
            attention_rank=attention_rank,
            hidden_size=hidden_size,
            dtype=dtype,
            max_chunk_bytes=max_chunk_bytes,
            link_s=link_s,
        )
        for rank, servicer in enumerate(servicers):
            stream: ExchangeStream = DuplexStream(
                cast(Any, servicer_opener(servicer.Exchange)),
                key_of=_key_of,
                peer=f"expert rank {rank} (in process)",
                name=f"combine-rx-{attention_rank}-{rank}",
            )
            self.streams.append(stream)
            self.planes.append(StreamPlane(links[rank], stream, self._codec))

    async def close(self) -> None:
        await close_each(self.streams)


def _key_of(message: expert_pb2.CombineChunk) -> ExchangeKey:
    return (message.micro_batch, message.layer)
