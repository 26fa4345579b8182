"""The in-process transport: the services' own gRPC handlers, called directly instead of over gRPC.

Each service's ``Run``/``Exchange`` servicer method is an async generator over a request iterator, and
each client's ``DuplexStream`` opens its stream through a callable that takes a request iterator. So the
simulator hands the client, as its opener, the servicer method itself (``ServicerCall``): messages are
the same protobufs, answered by the same handlers, routed back by the same ``DuplexStream``; only the
sockets are gone. Between attention and expert ranks the rows still travel as shape-only chunks of the
``grpc`` data plane (``StreamPlane``), which charges the modelled link time of each dispatch; the expert
side charges each result's (``ExpertExchange.transfer_s``), both as timed waits on the virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from asap.dataplane.plane import ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.planes import ExchangeStream, StreamPlane
from asap.emulation.clock import charge
from asap.model.placement import RankDispatch
from asap.rpc.duplex import DuplexStream
from asap.rpc.status import error_from_wire
from asap.sim.devices import Inline
from asap.syncstep import SyncStep
from asap.v1 import expert_pb2
from asap.wire.chunks import Dispatch, dispatch_bytes

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from expert_svc.core import ExpertResult
    from expert_svc.exchange import ExchangeSession, ExpertExchange
    from expert_svc.server import ExpertServicer

__all__ = [
    "DirectExpertTransport",
    "DirectPlane",
    "InProcessExpertTransport",
    "ServicerCall",
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
    async def exchange(self, request: PlaneRequest) -> ExchangeResult: ...


class _PerRankPlanes:
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
    ) -> Coroutine[Any, Any, ExchangeResult]:
        """The rank's plane's exchange (its coroutine, awaited by the caller: no frame of its own)."""
        return self.planes[rank].exchange(PlaneRequest(micro_batch, layer, dispatch, sync))


class InProcessExpertTransport(_PerRankPlanes):
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
        for rank, servicer in enumerate(servicers):
            stream: ExchangeStream = DuplexStream(
                cast(Any, servicer_opener(servicer.Exchange)),
                key_of=_key_of,
                peer=f"expert rank {rank} (in process)",
                name=f"combine-rx-{attention_rank}-{rank}",
            )
            spec = LinkSpec(
                attention_rank=attention_rank,
                expert_rank=rank,
                hidden_size=hidden_size,
                dtype=dtype,
                device=torch.device("cpu"),
                max_chunk_bytes=max_chunk_bytes,
                link_s=link_s,
            )
            self.streams.append(stream)
            self.planes.append(StreamPlane(spec, stream, self._codec))

    async def close(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(Exception):
                await stream.close()


def _key_of(message: expert_pb2.CombineChunk) -> ExchangeKey:
    return (message.micro_batch, message.layer)


class _Answer:
    """A computed chunk's answer as the in-process plane takes it: the result tensor, no message."""

    __slots__ = ("barrier_ns", "hidden", "key")

    def __init__(self, key: ExchangeKey, hidden: torch.Tensor, barrier_ns: int) -> None:
        self.key = key
        self.hidden = hidden
        self.barrier_ns = barrier_ns


def _answer(dispatch: Dispatch, result: ExpertResult, barrier_ns: int) -> _Answer:
    """The expert session's ``answer`` hook for the in-process plane (replaces the ``CombineChunk``)."""
    return _Answer((dispatch.micro_batch, dispatch.layer), result.hidden, barrier_ns)


class DirectPlane:
    """One attention -> expert link in process without messages: a dispatch, after its modelled link
    time, goes to the expert rank's ``ExchangeSession.accept`` as a ``chunks.Dispatch`` of the attention
    rank's own (shape-only) tensors, and the answer comes back through this plane's ``put`` as the
    result tensor. Everything in between is the expert service's code (barrier, queue, merging,
    expert-overlap lock, result link time); only the protobuf chunks and the stream's queue and task
    hops are gone. One chunk per dispatch, as the ``grpc`` plane sends shape-only rows."""

    name = "direct"
    charge_empty = False
    """Charge ``link_s(0)`` for a dispatch of no rows too (``asap.sim.hostcost``: a rank that sends empty
    dispatches still runs the layer's host control path; off, an empty dispatch leaves at once)."""

    def __init__(self, spec: LinkSpec, session: ExchangeSession) -> None:
        self.spec = spec
        self.session = session
        self._waiting: dict[ExchangeKey, asyncio.Future[_Answer]] = {}

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        key = request.key
        if key in self._waiting:
            raise ValueError(
                f"expert rank {self.spec.expert_rank}: a request under key {key!r} is already waiting"
            )
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            dispatch = request.dispatch
            rows = request.rows
            link_s = self.spec.link_s
            if link_s is not None and (rows or self.charge_empty):
                top_k = int(dispatch.expert_ids.shape[1])
                nbytes = dispatch_bytes(rows, self.spec.hidden_size, top_k, self.spec.dtype.itemsize)
                await charge(link_s(nbytes if rows else 0))
            chunk = Dispatch(
                micro_batch=request.micro_batch,
                layer=request.layer,
                attention_rank=self.spec.attention_rank,
                row_offset=0,
                total_rows=rows,
                hidden=dispatch.hidden,
                expert_ids=_as(dispatch.expert_ids, torch.int32),
                weights=_as(dispatch.weights, torch.float32),
                traceparent=request.traceparent,
                tracestate=request.tracestate,
                sent_unix_nanos=time.time_ns(),
                sync=request.sync,
                counted=dispatch.counted,
            )
            await self.session.accept(chunk, self)
            request.sent()
            answer = await future
            return ExchangeResult(answer.hidden, answer.barrier_ns)
        finally:
            self._waiting.pop(key, None)

    async def put(self, item: _Answer | expert_pb2.CombineChunk | None) -> None:
        """The session's answer for one chunk (``expert_svc.exchange.Answers``): a result, or an error
        message as the expert rank answers a chunk it rejected or failed to compute."""
        if item is None:
            return
        if isinstance(item, _Answer):
            future = self._waiting.get(item.key)
            if future is not None and not future.done():
                future.set_result(item)
            return
        future = self._waiting.get((item.micro_batch, item.layer))
        if future is not None and not future.done():
            where = f"combine chunk (micro_batch {item.micro_batch}, layer {item.layer}, rows from {item.row_offset})"
            future.set_exception(error_from_wire(item.error, f"{where} failed on the expert rank"))

    async def close(self) -> None:
        await self.session.abandon()
        self.session.close()


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call when it already is (what the split makes: per dispatch,
    a torch call costs more than the rest of the hand-off)."""
    return tensor if tensor.dtype is dtype else tensor.to(dtype)


class DirectExpertTransport(_PerRankPlanes):
    """An attention rank's ``ExpertTransport`` to in-process expert ranks over ``DirectPlane`` links:
    per expert rank one ``ExchangeSession`` of its ``ExpertExchange`` (as one stream would have)."""

    counts_routes = True
    """The attention rank's split counts each dispatch's ids per expert once for all ranks
    (``split_by_rank(count=True)``), and the expert ranks take those counts instead of counting the
    same ids again (``chunks.Dispatch.counted``): the same counts, so the same modelled times."""

    def __init__(
        self,
        exchanges: Sequence[ExpertExchange],
        *,
        attention_rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_chunk_bytes: int,
        link_s: Callable[[int], float],
    ) -> None:
        self.planes: list[DirectPlane] = [
            DirectPlane(
                LinkSpec(
                    attention_rank=attention_rank,
                    expert_rank=rank,
                    hidden_size=hidden_size,
                    dtype=dtype,
                    device=torch.device("cpu"),
                    max_chunk_bytes=max_chunk_bytes,
                    link_s=link_s,
                ),
                exchange.session(answer=_answer),
            )
            for rank, exchange in enumerate(exchanges)
        ]

    async def close(self) -> None:
        for plane in self.planes:
            with contextlib.suppress(Exception):
                await plane.close()
