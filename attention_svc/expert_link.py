"""The stream from an attention rank to one expert rank, and the data plane of that link.

One long-lived ``Expert.Exchange`` stream. A receiver task routes each CombineChunk to the dispatch it
answers. The send queue needs no bound of its own: every dispatch awaits its combine result, so what is
queued is bounded by the micro-batches in flight, and grpc flow control holds the rest back when the
expert rank is slow. When the stream breaks, every dispatch waiting on it fails with ``Unavailable`` at
once, and the next exchange opens a fresh stream.

Data plane (``asap.dataplane.select``): ``grpc`` sends the hidden rows inline as bytes; ``shm`` (same-host
CPU ranks) and ``cuda-ipc`` (same-host GPU ranks) write them into a region of the link (POSIX shared
memory, or GPU memory shared by CUDA IPC) and the chunk carries only a reference; the expert rank writes
the results back over the same rows and answers with a reference. Expert ids, weights and control stay on
the stream (see ``asap.dataplane``). A chunk whose rows do not fit in the region's free space goes inline,
and so do its results.

On CUDA, hidden rows are produced on the attention rank's compute stream; the codec thread waits for the
dispatch's ``ready`` event on its own stream, copies the rows (into the region, or to the host for gRPC)
and synchronises that stream only. Results are copied out of the region on a receive stream and
synchronised before the dispatch completes, so the compute thread never waits on a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import torch

from asap.dataplane.cuda_ipc import DEFAULT_CUDA_REGION_BYTES, CudaRegion, gpu_uuid
from asap.dataplane.link import LinkRegions
from asap.dataplane.select import confirm_data_plane, select_data_plane
from asap.dataplane.shm import DEFAULT_REGION_BYTES, ShmRegion
from asap.errors import AsapError, InternalError, Unavailable
from asap.model.placement import RankDispatch
from asap.rpc.server import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from asap.rpc.status import error_from_rpc
from asap.telemetry import setup, spans
from asap.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from asap.wire.chunks import CombineAssembler, dispatch_bytes, dispatch_chunks
from attention_svc.core import ExchangeResult

if TYPE_CHECKING:
    from opentelemetry.context import Context

logger = logging.getLogger(__name__)

_Key = tuple[int, int]  # (micro_batch, layer)


@dataclass(slots=True)
class _Pending:
    assembler: CombineAssembler
    future: asyncio.Future[torch.Tensor]
    answered: int = 0
    """Chunks the expert rank has answered so far."""


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
        region_bytes: int | None = None,
    ) -> None:
        self.target = target
        self.requested_plane = data_plane
        self.device = torch.device(device)
        self.data_plane = select_data_plane(data_plane, target, device, emulated=link_s is not None)
        """``grpc``, ``shm`` or ``cuda-ipc``; ``auto`` may still fall back to grpc after ``info``."""
        if region_bytes is None:
            region_bytes = (
                DEFAULT_CUDA_REGION_BYTES if self.data_plane == "cuda-ipc" else DEFAULT_REGION_BYTES
            )
        self.region_bytes = region_bytes
        self.regions: LinkRegions | None = None
        """Same-host planes: the link's regions, slots and quarantine (set once the plane is settled)."""
        self._rx: torch.cuda.Stream | None = None
        """cuda-ipc: the stream results are copied out of the region on."""
        self.shm_bytes = 0
        """Hidden-row payload bytes sent through a region (shared memory or CUDA IPC)."""
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
        uuid = gpu_uuid(self.device) if self.data_plane == "cuda-ipc" else ""
        self.data_plane = confirm_data_plane(
            self.requested_plane, self.data_plane, info, gpu_uuid=uuid, where=f"{self.rank} at {self.target}"
        )
        if self.data_plane == "cuda-ipc" and self._rx is None:
            self._rx = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        if self.by_reference and self.regions is None:
            self.regions = LinkRegions(
                self.data_plane,
                size=self.region_bytes,
                attention_rank=self.attention_rank,
                expert_rank=self.rank,
                device=self.device,
            )
        return info

    @property
    def result_ref_bytes(self) -> int:
        """Result bytes the expert rank wrote back into this link's regions (not inline)."""
        return self.regions.result_ref_bytes if self.regions is not None else 0

    @property
    def quarantined(self) -> int:
        """Dispatches abandoned with chunks unanswered, whose slots waited for the late answers."""
        return self.regions.quarantined if self.regions is not None else 0

    @property
    def by_reference(self) -> bool:
        """Whether hidden rows travel through a region of the link (shm or cuda-ipc)."""
        return self.data_plane in ("shm", "cuda-ipc")

    async def _ensure_stream(self) -> asyncio.Queue[expert_pb2.DispatchChunk | None]:
        async with self._lock:
            if self._outbox is not None and self._receiver is not None and not self._receiver.done():
                return self._outbox
            outbox: asyncio.Queue[expert_pb2.DispatchChunk | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[expert_pb2.DispatchChunk]:
                while (chunk := await outbox.get()) is not None:
                    yield chunk

            if self.regions is not None:
                self.regions.new_stream()  # a new stream may reach a new expert process: a new region
            call = self._stub.Exchange(requests())
            self._outbox = outbox
            self._receiver = asyncio.create_task(self._receive(call, outbox), name=f"combine-rx-{self.rank}")
            return outbox

    def _add(self, pending: _Pending, msg: expert_pb2.CombineChunk) -> bool:
        if self._rx is None:
            return pending.assembler.add(msg)
        with torch.cuda.stream(self._rx):
            complete = pending.assembler.add(msg)
            if complete:
                self._rx.synchronize()  # results out of the region before the slots can be reused
        return complete

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
                if pending is None:  # the dispatch was cancelled or failed; drop its results
                    if self.regions is not None:
                        self.regions.late_answer(key)
                    continue
                pending.answered += 1
                try:
                    complete = self._add(pending, msg)
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
            if self.regions is not None:
                self.regions.stream_ended()

    def _fail_all(self, error: AsapError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
        if pending:
            logger.warning("%s; failed %d waiting dispatches", error.message, len(pending))

    def _encode(
        self,
        dispatch: RankDispatch,
        place: Callable[[torch.Tensor], common_pb2.Tensor | None] | None,
        **fields: Any,
    ) -> list[expert_pb2.DispatchChunk]:
        """On the codec thread: the dispatch's chunks, hidden rows placed in the region where possible."""
        if dispatch.ready is not None:  # produced on the compute stream: wait for it on this thread's stream
            torch.cuda.current_stream(self.device).wait_event(dispatch.ready)
        max_chunk_bytes = self.max_chunk_bytes
        if self.data_plane == "cuda-ipc":
            # Rows move through GPU memory: chunks carry only ids and weights, so one chunk per dispatch
            # (up to the message bound) spares the expert rank calls.
            max_chunk_bytes = MAX_MESSAGE_BYTES // 2
        chunks = dispatch_chunks(
            attention_rank=self.attention_rank,
            hidden=dispatch.hidden,
            expert_ids=dispatch.expert_ids,
            weights=dispatch.weights,
            max_chunk_bytes=max_chunk_bytes,
            place_hidden=place,
            **fields,
        )
        if self.data_plane == "cuda-ipc":
            torch.cuda.current_stream(self.device).synchronize()  # rows in the region before the signal
        return chunks

    async def exchange(
        self,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        step: int = 0,
        participants: int = 0,
        trace: Context | None = None,
    ) -> ExchangeResult:
        key = (micro_batch, layer)
        if key in self._pending:
            raise InternalError(f"dispatch {key} to expert rank {self.rank} is already in flight")
        outbox = await self._ensure_stream()
        loop = asyncio.get_running_loop()
        rows = int(dispatch.hidden.shape[0])
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        assembler = CombineAssembler(
            rows,
            self.hidden_size,
            self.dtype,
            shape_only=self.shape_only,
            refs=self.regions.resolve if self.regions is not None else None,
            device=self.device if self.data_plane == "cuda-ipc" else "cpu",
        )
        pending = _Pending(assembler, future)
        self._pending[key] = pending
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
        slots = self.regions.take() if self.regions is not None else None
        place = slots.placer() if slots is not None else None
        sent = 0
        completed = False
        try:
            chunks = await loop.run_in_executor(
                self._codec,
                lambda: self._encode(
                    dispatch,
                    place,
                    micro_batch=micro_batch,
                    layer=layer,
                    step=step,
                    sync_participants=participants,
                    traceparent=traceparent,
                    tracestate=tracestate,
                ),
            )
            if not self.shape_only:
                for chunk in chunks:
                    nbytes = int(chunk.hidden.shape[0]) * self.hidden_size * self.dtype.itemsize
                    if chunk.hidden.HasField("shm") or chunk.hidden.HasField("cuda_ipc"):
                        self.shm_bytes += nbytes
                    else:
                        self.inline_hidden_bytes += nbytes
            if self.link_s is not None and rows:
                nbytes = dispatch_bytes(
                    rows, self.hidden_size, dispatch.expert_ids.shape[1], self.dtype.itemsize
                )
                await asyncio.sleep(self.link_s(nbytes))
            region = slots.region if slots is not None else None
            if isinstance(region, CudaRegion) and not region.announced and chunks:
                chunks[0].cuda_region.CopyFrom(region.announcement())  # once per stream, on its first chunk
                region.announced = True
            for chunk in chunks:
                outbox.put_nowait(chunk)
            sent = len(chunks)
            if span is not None:
                span.end()
                span = None
            hidden = await future
            completed = True
            if slots is not None and slots.offsets and isinstance(region, ShmRegion):
                # The expert rank has attached the region (it answered rows it read from it): remove the
                # name now, so the memory goes away with the two processes even if one is killed.
                region.unlink()
            return ExchangeResult(hidden, assembler.barrier_ns)
        finally:
            if span is not None:  # failed or cancelled before everything was sent
                span.end()
            self._pending.pop(key, None)
            if slots is not None and self.regions is not None:
                outstanding = 0 if completed else sent - pending.answered
                self.regions.finish(key, slots, outstanding=outstanding, stream_alive=self._outbox is outbox)

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        await self._channel.close()
        if self.regions is not None:
            self.regions.close()
