"""Transport from an attention rank to the expert ranks: gRPC streams, activations inline or in shm.

One long-lived ``Expert.Exchange`` stream per expert rank. A receiver task routes each CombineChunk to the
dispatch it answers. The send queue needs no bound of its own: every dispatch awaits its combine result,
so what is queued is bounded by the micro-batches in flight, and grpc flow control holds the rest back
when an expert rank is slow.
When a stream breaks, every dispatch waiting on it fails with ``Unavailable`` at once, and the next
exchange opens a fresh stream.

Data plane per link (``select_data_plane``): ``grpc`` sends the hidden rows inline as bytes; ``shm``
(same-host CPU ranks) writes them into a POSIX shared-memory region of the link and the chunk carries
only a reference, while expert ids, weights, control and combine results stay on the stream (see
``asap.dataplane.shm``). A chunk whose rows do not fit in the region's free space goes inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from asap.dataplane.shm import (
    DEFAULT_REGION_BYTES,
    ShmRegion,
    SlotAllocator,
    region_name,
    select_data_plane,
    shm_tensor,
)
from asap.errors import AsapError, InternalError, InvalidArgument, Unavailable
from asap.model.placement import RankDispatch
from asap.rpc.server import GRPC_OPTIONS
from asap.rpc.status import error_from_rpc
from asap.telemetry import setup, spans
from asap.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from asap.wire.chunks import CombineAssembler, dispatch_chunks

if TYPE_CHECKING:
    from opentelemetry.context import Context

logger = logging.getLogger(__name__)

_Key = tuple[int, int]  # (micro_batch, layer)


@dataclass(slots=True)
class _Pending:
    assembler: CombineAssembler
    future: asyncio.Future[torch.Tensor]


class ExpertLink:
    """The stream to one expert rank."""

    def __init__(
        self,
        target: str,
        rank: int,
        *,
        attention_rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_chunk_bytes: int,
        codec: ThreadPoolExecutor,
        link_s: Callable[[int], float] | None = None,
        data_plane: str = "grpc",
        device: str = "cpu",
        region_bytes: int = DEFAULT_REGION_BYTES,
    ) -> None:
        self.target = target
        self.requested_plane = data_plane
        self.data_plane = select_data_plane(data_plane, target, device, emulated=link_s is not None)
        """``grpc`` or ``shm``; ``auto`` may still fall back to grpc if the expert rank lacks shm."""
        self.region_bytes = region_bytes
        self._region: ShmRegion | None = None
        self._slots: SlotAllocator | None = None
        self._retired: set[ShmRegion] = set()
        """Regions of earlier streams, unmapped once no dispatch uses them any more."""
        self._users: dict[ShmRegion, int] = {}
        """Dispatches currently placing rows into each region (their chunks may still be written)."""
        self.shm_bytes = 0
        """Hidden-row payload bytes sent through shared memory."""
        self.inline_hidden_bytes = 0
        """Hidden-row payload bytes sent inline on the stream."""
        self.link_s = link_s
        """Emulated compute: activations travel as shapes only, and each dispatch is charged this link
        time (seconds for a payload of that many bytes) before it is sent."""
        self.shape_only = link_s is not None
        self.rank = rank
        self.attention_rank = attention_rank
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_chunk_bytes = max_chunk_bytes
        self._codec = codec
        self._channel = grpc.aio.insecure_channel(target, options=list(GRPC_OPTIONS))
        self._stub = expert_pb2_grpc.ExpertStub(self._channel)
        self._pending: dict[_Key, _Pending] = {}
        self._outbox: asyncio.Queue[expert_pb2.DispatchChunk | None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def info(self, timeout_s: float) -> expert_pb2.ExpertInfo:
        try:
            info: expert_pb2.ExpertInfo = await self._stub.Info(
                expert_pb2.ExpertInfoRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise Unavailable(
                f"expert rank {self.rank} at {self.target}: {error_from_rpc(exc).message}"
            ) from exc
        if self.data_plane == "shm" and not info.shm_data_plane:
            if self.requested_plane == "shm":
                raise InvalidArgument(
                    f"--data-plane shm is not possible: expert rank {self.rank} at {self.target} "
                    "does not accept shared memory (started with --data-plane grpc or non-cpu device?)"
                )
            self.data_plane = "grpc"
        return info

    def _place(
        self, offsets: list[int]
    ) -> tuple[Callable[[torch.Tensor], common_pb2.Tensor | None], ShmRegion, SlotAllocator]:
        """The ``place_hidden`` hook of one dispatch (rows into a free slot, offsets recorded, or None when
        they do not fit), with the region and allocator it uses (the dispatch frees into those)."""
        if self._region is None or self._slots is None:
            name = region_name(self.attention_rank, self.rank)
            self._region = ShmRegion.create(name, self.region_bytes)
            self._slots = SlotAllocator(self.region_bytes)
        region, slots = self._region, self._slots
        self._users[region] = self._users.get(region, 0) + 1  # released in exchange's finally

        def place(rows: torch.Tensor) -> common_pb2.Tensor | None:
            offset = slots.alloc(rows.numel() * rows.element_size())
            if offset is None:
                return None  # does not fit now: inline bytes
            offsets.append(offset)
            return shm_tensor(rows, region, offset)

        return place, region, slots

    def _release_retired(self) -> None:
        for region in list(self._retired):
            if not self._users.get(region):
                region.close()
                self._retired.discard(region)
                self._users.pop(region, None)

    async def _ensure_stream(self) -> asyncio.Queue[expert_pb2.DispatchChunk | None]:
        async with self._lock:
            if self._outbox is not None and self._receiver is not None and not self._receiver.done():
                return self._outbox
            outbox: asyncio.Queue[expert_pb2.DispatchChunk | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[expert_pb2.DispatchChunk]:
                while (chunk := await outbox.get()) is not None:
                    yield chunk

            if self._region is not None and self._slots is not None:
                # A new stream may reach a new expert process: give it a new region. The old one is
                # retired: its name goes now, its mapping once no dispatch still writes into it.
                self._region.unlink()
                self._retired.add(self._region)
                self._release_retired()
                self._region, self._slots = None, None
            call = self._stub.Exchange(requests())
            self._outbox = outbox
            self._receiver = asyncio.create_task(self._receive(call, outbox), name=f"combine-rx-{self.rank}")
            return outbox

    async def _receive(
        self,
        call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
        outbox: asyncio.Queue[expert_pb2.DispatchChunk | None],
    ) -> None:
        reason = "stream closed by the expert rank"
        try:
            async for msg in call:
                key = (msg.micro_batch, msg.layer)
                pending = self._pending.get(key)
                if pending is None:
                    continue  # the dispatch was cancelled; drop its late results
                try:
                    complete = pending.assembler.add(msg)
                except AsapError as exc:
                    self._pending.pop(key, None)
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                    continue
                if complete:
                    self._pending.pop(key, None)
                    if not pending.future.done():
                        pending.future.set_result(pending.assembler.result())
        except grpc.RpcError as exc:
            reason = error_from_rpc(exc).message
        except asyncio.CancelledError:
            reason = "link closed"
            raise
        finally:
            if self._outbox is outbox:
                self._outbox = None
            self._fail_all(Unavailable(f"expert rank {self.rank} at {self.target}: {reason}"))
            call.cancel()

    def _fail_all(self, error: AsapError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
        if pending:
            logger.warning("%s; failed %d waiting dispatches", error.message, len(pending))

    async def exchange(
        self,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        step: int = 0,
        participants: int = 0,
        trace: Context | None = None,
    ) -> torch.Tensor:
        key = (micro_batch, layer)
        if key in self._pending:
            raise InternalError(f"dispatch {key} to expert rank {self.rank} is already in flight")
        outbox = await self._ensure_stream()
        loop = asyncio.get_running_loop()
        rows = int(dispatch.hidden.shape[0])
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        assembler = CombineAssembler(rows, self.hidden_size, self.dtype, shape_only=self.shape_only)
        self._pending[key] = _Pending(assembler, future)
        span = None
        traceparent = tracestate = ""
        if trace is not None:
            # Encoding and sending are the dispatch span; its context rides in every chunk, so the
            # expert rank's spans of these rows join this trace although the stream is shared.
            span = setup.get_tracer().start_span(
                spans.ATTENTION_DISPATCH,
                context=trace,
                attributes={
                    spans.LAYER: layer,
                    spans.EXPERT_RANK: self.rank,
                    spans.TOKENS: rows,
                    spans.MICRO_BATCH: micro_batch,
                },
            )
            traceparent, tracestate = spans.inject(spans.context_of(span))
        offsets: list[int] = []  # shm slots of this dispatch, freed once it is answered or abandoned
        place, region, slots = self._place(offsets) if self.data_plane == "shm" else (None, None, None)
        try:
            chunks = await loop.run_in_executor(
                self._codec,
                lambda: dispatch_chunks(
                    micro_batch=micro_batch,
                    layer=layer,
                    attention_rank=self.attention_rank,
                    hidden=dispatch.hidden,
                    expert_ids=dispatch.expert_ids,
                    weights=dispatch.weights,
                    max_chunk_bytes=self.max_chunk_bytes,
                    step=step,
                    sync_participants=participants,
                    traceparent=traceparent,
                    tracestate=tracestate,
                    place_hidden=place,
                ),
            )
            if not self.shape_only:
                for chunk in chunks:
                    nbytes = int(chunk.hidden.shape[0]) * self.hidden_size * self.dtype.itemsize
                    if chunk.hidden.HasField("shm"):
                        self.shm_bytes += nbytes
                    else:
                        self.inline_hidden_bytes += nbytes
            if self.link_s is not None and rows:
                nbytes = rows * (self.hidden_size * self.dtype.itemsize + dispatch.expert_ids.shape[1] * 8)
                await asyncio.sleep(self.link_s(nbytes))
            for chunk in chunks:
                outbox.put_nowait(chunk)
            if span is not None:
                span.end()
                span = None
            result = await future
            if offsets and region is not None:
                # The expert rank has attached the region (it answered rows it read from it): remove the
                # name now, so the memory goes away with the two processes even if one is killed.
                region.unlink()
            return result
        finally:
            if span is not None:  # failed or cancelled before everything was sent
                span.end()
            self._pending.pop(key, None)
            if slots is not None and region is not None:
                for offset in offsets:
                    slots.free(offset)
                self._users[region] -= 1
                self._release_retired()

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        await self._channel.close()
        if self._region is not None:
            self._region.destroy()
        for region in self._retired:
            region.destroy()
        self._retired.clear()
        self._users.clear()


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
        region_bytes: int = DEFAULT_REGION_BYTES,
    ) -> None:
        self._codec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attention-codec")
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
        step: int = 0,
        participants: int = 0,
        trace: Context | None = None,
    ) -> torch.Tensor:
        return await self.links[rank].exchange(
            micro_batch, layer, dispatch, step=step, participants=participants, trace=trace
        )

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))
        self._codec.shutdown(wait=False, cancel_futures=True)
