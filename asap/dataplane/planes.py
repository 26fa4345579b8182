"""The data planes carried by the link's ``Expert.Exchange`` stream: gRPC bytes, shared memory, CUDA IPC.

All three send a dispatch as ``DispatchChunk`` messages on the stream and assemble the ``CombineChunk``
answers (``StreamPlane.exchange``); they differ only in where the hidden rows and the results lie:

- ``StreamPlane`` (``grpc``): inline in the messages, as bytes (and as shapes only with emulated compute,
  where each dispatch is charged the modeled link time before it is sent);
- ``ShmPlane`` (``shm``): in a POSIX shared-memory region of the link, the chunk carries a reference, the
  expert rank writes results back over the rows;
- ``CudaIpcPlane`` (``cuda-ipc``): the same in GPU memory shared by CUDA IPC; the region is announced on
  the first chunk of each stream, rows are copied in on the codec thread's stream and results copied out on
  a receive stream, so the compute thread never waits on a transfer.

Rows that do not fit in a region's free space go inline, and so do their results (``LinkRegions``).
``make_plane`` builds the plane a link settled on (``asap.dataplane.select``); the contract is
``asap.dataplane.plane.DataPlane``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import torch

from asap.dataplane.cuda_ipc import DEFAULT_CUDA_REGION_BYTES, CudaRegion
from asap.dataplane.fast import FastOptions, FastPlane
from asap.dataplane.gpu_fast import GpuFastPlane
from asap.dataplane.link import LinkRegions, Slots
from asap.dataplane.offloop import on_thread
from asap.dataplane.plane import DataPlane, ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest, PlaneStats
from asap.dataplane.shm import DEFAULT_REGION_BYTES
from asap.errors import InvalidArgument
from asap.rpc.duplex import DuplexStream
from asap.rpc.server import MAX_MESSAGE_BYTES
from asap.v1 import common_pb2, expert_pb2
from asap.wire.chunks import CombineAssembler, dispatch_bytes, dispatch_chunks

__all__ = ["CudaIpcPlane", "ExchangeStream", "ShmPlane", "StreamPlane", "make_plane"]

ExchangeStream = DuplexStream[expert_pb2.DispatchChunk, expert_pb2.CombineChunk, ExchangeKey]
"""The link's ``Expert.Exchange`` stream: chunks out, combine chunks routed back by (micro_batch, layer)."""


class _Answers:
    """Collects the combine chunks of one dispatch, counting them: a dispatch abandoned with chunks
    unanswered keeps its slots reserved for the late answers."""

    __slots__ = ("answered", "assembler", "rx")

    def __init__(self, assembler: CombineAssembler, rx: torch.cuda.Stream | None) -> None:
        self.assembler = assembler
        self.rx = rx
        self.answered = 0

    def add(self, message: expert_pb2.CombineChunk) -> bool:
        self.answered += 1
        if self.rx is None:
            return self.assembler.add(message)
        with torch.cuda.stream(self.rx):
            complete = self.assembler.add(message)
            if complete:
                self.rx.synchronize()  # results out of the region before the slots can be reused
        return complete

    def result(self) -> torch.Tensor:
        return self.assembler.result()


class StreamPlane:
    """The ``grpc`` plane, and the round trip every stream-carried plane shares (see the module doc).

    Subclasses change where rows go (``_take``), how results are read (``_refs``, ``_rx``), the chunk
    size, and what happens around the send (``_after_encode``, ``_announce``, ``_answered``).
    """

    name = "grpc"

    def __init__(self, spec: LinkSpec, stream: ExchangeStream, codec: Executor) -> None:
        self.spec = spec
        self.stream = stream
        self._codec = codec
        self._sent = PlaneStats()
        self.regions: LinkRegions | None = None
        """Same-host planes: the link's regions, slots and quarantine."""
        self.max_chunk_bytes = spec.max_chunk_bytes
        self._rx: torch.cuda.Stream | None = None
        """cuda-ipc: the stream results are copied out of the region on."""

    @property
    def stats(self) -> PlaneStats:
        regions = self.regions
        return PlaneStats(
            region_hidden_bytes=self._sent.region_hidden_bytes,
            inline_hidden_bytes=self._sent.inline_hidden_bytes,
            result_ref_bytes=regions.result_ref_bytes if regions is not None else 0,
            quarantined=regions.quarantined if regions is not None else 0,
        )

    # --- hooks of the same-host planes (the grpc plane has no regions) ------------------------------

    def _take(self) -> Slots | None:
        return self.regions.take() if self.regions is not None else None

    def _assembler(self, rows: int) -> CombineAssembler:
        spec = self.spec
        return CombineAssembler(
            rows,
            spec.hidden_size,
            spec.dtype,
            shape_only=spec.shape_only,
            refs=self.regions.resolve if self.regions is not None else None,
            device="cpu",
        )

    def _after_encode(self) -> None:
        """On the codec thread, after the rows were placed."""

    def _announce(self, chunks: list[expert_pb2.DispatchChunk], slots: Slots | None) -> None:
        """Before the chunks are sent (the first chunk may announce the region)."""

    def _answered(self, slots: Slots | None) -> None:
        """After every chunk of the dispatch was answered."""

    # --- stream hooks --------------------------------------------------------------------------------

    def stream_opened(self) -> None:
        if self.regions is not None:
            self.regions.new_stream()  # a new stream may reach a new expert process: a new region

    def answer_dropped(self, key: ExchangeKey) -> None:
        if self.regions is not None:
            self.regions.late_answer(key)

    def stream_ended(self) -> None:
        if self.regions is not None:
            self.regions.stream_ended()

    def close(self) -> None:
        if self.regions is not None:
            self.regions.close()

    # --- the round trip ------------------------------------------------------------------------------

    def _encode(
        self, request: PlaneRequest, place: Callable[[torch.Tensor], common_pb2.Tensor | None] | None
    ) -> list[expert_pb2.DispatchChunk]:
        """On the codec thread: the dispatch's chunks, hidden rows placed in the region where possible."""
        dispatch = request.dispatch
        if dispatch.ready is not None:  # produced on the compute stream: wait for it on this thread's stream
            torch.cuda.current_stream(self.spec.device).wait_event(dispatch.ready)
        chunks = dispatch_chunks(
            micro_batch=request.micro_batch,
            layer=request.layer,
            attention_rank=self.spec.attention_rank,
            hidden=dispatch.hidden,
            expert_ids=dispatch.expert_ids,
            weights=dispatch.weights,
            max_chunk_bytes=self.max_chunk_bytes,
            place_hidden=place,
            sync=request.sync,
            traceparent=request.traceparent,
            tracestate=request.tracestate,
        )
        self._after_encode()
        return chunks

    def _account(self, chunks: list[expert_pb2.DispatchChunk]) -> None:
        if self.spec.shape_only:
            return
        row_bytes = self.spec.hidden_size * self.spec.dtype.itemsize
        for chunk in chunks:
            nbytes = int(chunk.hidden.shape[0]) * row_bytes
            if chunk.hidden.HasField("shm") or chunk.hidden.HasField("cuda_ipc"):
                self._sent.region_hidden_bytes += nbytes
            else:
                self._sent.inline_hidden_bytes += nbytes

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        key = request.key
        session = self.stream.open()
        answers = _Answers(self._assembler(request.rows), self._rx)
        slots: Slots | None = None
        sent = 0
        completed = False
        try:
            slots = self._take()
            future = self.stream.expect(key, answers)
            place = slots.placer() if slots is not None else None
            chunks = await on_thread(self._codec, self._encode, request, place)  # slots free only after it
            self._account(chunks)
            link_s = self.spec.link_s
            if link_s is not None and request.rows:
                top_k = int(request.dispatch.expert_ids.shape[1])
                nbytes = dispatch_bytes(request.rows, self.spec.hidden_size, top_k, self.spec.dtype.itemsize)
                await asyncio.sleep(link_s(nbytes))
            self._announce(chunks, slots)
            for chunk in chunks:
                session.send(chunk)
            sent = len(chunks)
            request.sent()
            hidden = await future
            completed = True
            self._answered(slots)
            return ExchangeResult(hidden, answers.assembler.barrier_ns)
        finally:
            self.stream.forget(key)
            if slots is not None and self.regions is not None:
                outstanding = 0 if completed else sent - answers.answered
                self.regions.finish(key, slots, outstanding=outstanding, stream_alive=session.alive)


class _RegionPlane(StreamPlane):
    """A stream plane whose rows travel through a same-host region of the link (its ``name`` names the
    kind of memory), ``default_region_bytes`` large unless the link spec says otherwise."""

    default_region_bytes: int

    def __init__(self, spec: LinkSpec, stream: ExchangeStream, codec: Executor) -> None:
        super().__init__(spec, stream, codec)
        self.regions = LinkRegions(
            self.name,
            size=spec.region_bytes or self.default_region_bytes,
            attention_rank=spec.attention_rank,
            expert_rank=spec.expert_rank,
            device=spec.device,
        )


class ShmPlane(_RegionPlane):
    """``shm``: rows and results in a POSIX shared-memory region of the link (same-host CPU ranks)."""

    name = "shm"
    default_region_bytes = DEFAULT_REGION_BYTES

    def _answered(self, slots: Slots | None) -> None:
        if slots is not None and slots.offsets:
            # The expert rank has attached the region (it answered rows it read from it): remove the
            # name now, so the memory goes away with the two processes even if one is killed.
            slots.region.unlink()


class CudaIpcPlane(_RegionPlane):
    """``cuda-ipc``: rows and results in GPU memory shared by CUDA IPC (same-host GPU ranks)."""

    name = "cuda-ipc"
    default_region_bytes = DEFAULT_CUDA_REGION_BYTES

    def __init__(self, spec: LinkSpec, stream: ExchangeStream, codec: Executor) -> None:
        super().__init__(spec, stream, codec)
        # Rows move through GPU memory: chunks carry only ids and weights, so one chunk per dispatch (up
        # to the message bound) spares the expert rank calls.
        self.max_chunk_bytes = MAX_MESSAGE_BYTES // 2
        self._rx = torch.cuda.Stream(spec.device)  # type: ignore[no-untyped-call]

    def _assembler(self, rows: int) -> CombineAssembler:
        spec = self.spec
        refs = self.regions.resolve if self.regions is not None else None
        return CombineAssembler(rows, spec.hidden_size, spec.dtype, refs=refs, device=spec.device)

    def _after_encode(self) -> None:
        torch.cuda.current_stream(self.spec.device).synchronize()  # rows in the region before the signal

    def _announce(self, chunks: list[expert_pb2.DispatchChunk], slots: Slots | None) -> None:
        region = slots.region if slots is not None else None
        if isinstance(region, CudaRegion) and not region.announced and chunks:  # (narrows the type)
            chunks[0].cuda_region.CopyFrom(region.announcement())  # once per stream, on its first chunk
            region.announced = True


_PLANES: dict[str, type[StreamPlane]] = {"grpc": StreamPlane, "shm": ShmPlane, "cuda-ipc": CudaIpcPlane}


def make_plane(
    name: str,
    spec: LinkSpec,
    stream: ExchangeStream,
    codec: Executor,
    *,
    fallback: str = "grpc",
    fast: FastOptions | None = None,
) -> DataPlane:
    """The plane ``name`` (as settled by ``confirm_data_plane``) of a link, carried by ``stream``, encoding
    on ``codec`` (one thread, with its own CUDA stream on GPU ranks). ``fast`` and ``nixl`` carry what
    their slots cannot over the plane ``fallback``; ``fast`` with the failure bounds ``fast``."""
    if name == "fast":
        options = fast if fast is not None else FastOptions()
        inner = make_plane(fallback, spec, stream, codec)
        kind = GpuFastPlane if spec.device.type == "cuda" else FastPlane
        return kind(
            spec, stream, codec, inner, peer_timeout_s=options.peer_timeout_s, attach_s=options.attach_s
        )
    if name == "nixl":
        from asap.dataplane.nixl_plane import NixlPlane  # NIXL is optional: loaded only where chosen

        return NixlPlane(spec, stream, codec, make_plane(fallback, spec, stream, codec))
    cls = _PLANES.get(name)
    if cls is None:
        raise InvalidArgument(f"no data plane {name!r}; known: {', '.join(_PLANES)}")
    return cls(spec, stream, codec)
