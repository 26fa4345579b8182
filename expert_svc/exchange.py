"""The chunk handling of an expert rank's ``Expert.Exchange`` streams, without grpc.

``ExpertExchange`` holds what every stream of the rank shares: the executor, the sync-step barrier, the
serial lock of expert-overlap off, the codec thread, the same-host attachments and the emulated transfer
charge. Each stream is an ``ExchangeSession``: it reads dispatch chunks, answers each with one combine
chunk, in completion order, through a queue (the servicer relays that queue as the stream's answers):

- async chunks are submitted to the executor as soon as they are decoded;
- sync chunks (their ``Dispatch.sync`` is set) wait at the step barrier for every participant's dispatch
  of their (step, layer), then are submitted; an empty one (an idle attention rank) is answered empty;
- expert-overlap off: one chunk at a time across all streams, received, computed and sent before the
  next is read (sync chunks take the lock after their barrier, or the step could never complete);
- emulated compute: sending a result is charged at the modeled link speed;
- a malformed chunk, or one whose computation fails, is answered with an error for that chunk; the stream
  goes on;
- a fast link announcement (``fast_link``) is not answered: the region is attached to the rank's
  ``FastLane`` and served from then on by its poll thread; it is detached when the stream ends;
- a NIXL link announcement (``nixl_link``) is answered with this rank's end (``NixlLane``), or refused
  with an error; it is detached when the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Protocol

from asap.dataplane.cuda_ipc import CudaAttachments
from asap.dataplane.offloop import on_thread
from asap.dataplane.shm import ShmAttachments
from asap.emulation import DeviceProfile
from asap.emulation.clock import charge
from asap.emulation.costs import transfer_s
from asap.errors import AsapError, InvalidArgument
from asap.model.hosted import HostedCounts
from asap.rpc.streams import cancel_all
from asap.telemetry import setup
from asap.v1 import expert_pb2
from asap.wire import chunks
from expert_svc.barrier import StepBarrier
from expert_svc.core import ExpertExecutor, ExpertResult
from expert_svc.fastlane import ExpertLinkEnd, FastLane
from expert_svc.nixl_lane import NixlExpertEnd, NixlLane
from expert_svc.regions import StreamRegions
from expert_svc.reply import Reply, error_reply, never_waits
from expert_svc.tracing import ChunkTrace

__all__ = ["Answers", "ExchangeSession", "ExpertExchange", "Outbound"]

logger = logging.getLogger(__name__)

Outbound = asyncio.Queue[expert_pb2.CombineChunk | None]
"""A session's answers, in completion order; ``None`` ends the stream."""


class Answers(Protocol):
    """Where ``ExchangeSession.accept`` puts a chunk's answer: the stream's ``Outbound`` queue, or an
    in-process caller's sink (``asap.sim``), which may also take what its ``answer`` hook made. A sink
    whose ``put`` never waits says so (``put_never_waits = True``), as an unbounded queue's does: its
    async chunks are then answered by ``Reply`` (``expert_svc.reply``)'s callbacks instead of a task each."""

    async def put(self, item: Any) -> None: ...


class ExpertExchange:
    """What the ``Exchange`` streams of one expert rank share; ``session()`` starts one stream's."""

    def __init__(
        self,
        executor: ExpertExecutor,
        codec: Executor,
        *,
        barrier: StepBarrier | None = None,
        overlap: bool = True,
        profile: DeviceProfile | None = None,
        shm: ShmAttachments | None = None,
        cuda_ipc: bool = False,
        fast: FastLane | None = None,
        nixl: NixlLane | None = None,
        result_link_s: Callable[[int, int], float] | None = None,
    ) -> None:
        self.executor = executor
        self.codec = codec
        """Encodes results (one bytes copy each, or the write into a region) off the event loop and off
        the compute thread, on its own CUDA stream."""
        self.barrier = barrier if barrier is not None else StepBarrier()
        self.overlap = overlap
        """expert-overlap: receive, compute and send of different chunks proceed concurrently."""
        self.serial = asyncio.Lock()
        """expert-overlap off: held by the one chunk being received, computed and sent."""
        self.profile = profile
        """Emulated compute: chunks carry shapes only, and sending a result is charged at the link speed."""
        self.shape_only = profile is not None
        self.shm = shm
        """Shared-memory data plane: regions of the attention ranks, attached on first reference (hidden
        rows are copied out once on decode); results are written back over the rows."""
        self.cuda_ipc = cuda_ipc
        """CUDA IPC data plane: each stream maps the regions its attention rank announces."""
        self.fast = fast
        """Fast data plane: the fast links announced on the streams, served by one poll thread."""
        self.nixl = nixl
        """NIXL data plane: the NIXL links announced on the streams (any host), served by one poll thread."""
        self.result_link_s = result_link_s
        """Emulated compute: link time of a result of (bytes, attention rank) in place of the profile's
        ``link_gbps`` (the simulator's network ports, ``asap.sim.links``); None = ``link_gbps``."""

    def transfer_s(self, rows: int, attention_rank: int | None = None) -> float:
        """Emulated link time of a combine result of ``rows`` rows to ``attention_rank`` (0 with real
        compute)."""
        if self.profile is None:
            return 0.0
        part = self.executor.part
        nbytes = rows * part.config.hidden_size * part.dtype.itemsize
        if self.result_link_s is not None and attention_rank is not None:
            return self.result_link_s(nbytes, attention_rank)
        return transfer_s(nbytes, self.profile)

    def close(self) -> None:
        """Detach the shared-memory regions of the attention ranks."""
        if self.shm is not None:
            self.shm.close()

    def session(
        self, answer: Callable[[chunks.Dispatch, ExpertResult, int], Any] | None = None
    ) -> ExchangeSession:
        """One stream's session; ``answer`` replaces how computed chunks are answered (``ExchangeSession``)."""
        return ExchangeSession(
            self, StreamRegions(self.shm, CudaAttachments() if self.cuda_ipc else None), answer
        )

    def decode(self, msg: expert_pb2.DispatchChunk, regions: StreamRegions) -> chunks.Dispatch:
        """Decode and validate one chunk against this rank's model (``InvalidArgument`` if malformed)."""
        part = self.executor.part
        cfg = part.config
        if msg.HasField("cuda_region"):
            regions.announce(msg.cuda_region)
        return chunks.decode_dispatch(
            msg,
            hidden_size=cfg.hidden_size,
            dtype=part.dtype,
            num_layers=cfg.num_layers,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            allow_shape_only=self.shape_only,
            refs=regions.decode if regions.enabled else None,
        )


class ExchangeSession:
    """One ``Exchange`` stream: ``run`` reads its chunks and queues their answers; ``close`` at the end."""

    def __init__(
        self,
        shared: ExpertExchange,
        regions: StreamRegions,
        answer: Callable[[chunks.Dispatch, ExpertResult, int], Any] | None = None,
    ) -> None:
        self.shared = shared
        self.regions = regions
        self.answer = answer if answer is not None else regions.answer
        """On the codec thread: a computed chunk's answer (by default its ``CombineChunk``; an
        in-process caller may take the result as it is)."""
        self._replies: set[asyncio.Future[None]] = set()
        """The answers being made: ``_reply`` tasks, and the ``done`` futures of ``Reply`` (``expert_svc.reply``) answers."""
        self._fast_ends: list[ExpertLinkEnd] = []
        self._nixl_ends: list[NixlExpertEnd] = []

    async def run(self, messages: AsyncIterable[expert_pb2.DispatchChunk], outbound: Outbound) -> None:
        """Answer every chunk of ``messages`` on ``outbound``, then queue ``None``. Cancelled (the
        attention rank went away): the chunks in progress are abandoned."""
        try:
            await self._read(messages, outbound)
        except asyncio.CancelledError:
            await self.abandon()
            raise

    async def abandon(self) -> None:
        """Cancel the chunks in progress (the attention rank went away) and wait until they are gone."""
        await cancel_all(self._replies)

    def close(self) -> None:
        self.regions.close()
        if self.shared.fast is not None:
            for end in self._fast_ends:
                self.shared.fast.detach(end)
        self._fast_ends.clear()
        if self.shared.nixl is not None:
            for nixl_end in self._nixl_ends:
                self.shared.nixl.detach(nixl_end)
        self._nixl_ends.clear()

    async def _connect_nixl(self, msg: expert_pb2.DispatchChunk) -> expert_pb2.CombineChunk:
        """A NIXL link announced on this stream: this rank's end as the answer (served until the stream
        ends), or the error that refuses it."""
        nixl = self.shared.nixl
        made: list[NixlExpertEnd] = []  # the end, once connected (a cancelled wait may still make it)

        def connect() -> tuple[NixlExpertEnd, expert_pb2.NixlLink]:
            assert nixl is not None
            end, answer = nixl.connect(msg.nixl_link)
            made.append(end)
            return end, answer

        try:
            if nixl is None:
                raise InvalidArgument("this expert rank has no NIXL data plane (--data-plane nixl or auto)")
            end, answer = await on_thread(self.shared.codec, connect)
        except AsapError as exc:
            logger.warning("rejected NIXL link %s: %s", msg.nixl_link.agent[:80], exc.message)
            return error_reply(msg.micro_batch, msg.layer, 0, 0, exc)
        except asyncio.CancelledError:  # the stream went away while connecting: nobody will use the end
            if nixl is not None:
                for made_end in made:
                    nixl.detach(made_end)
            raise
        self._nixl_ends.append(end)
        return expert_pb2.CombineChunk(micro_batch=msg.micro_batch, layer=msg.layer, nixl_link=answer)

    def _attach_fast(self, msg: expert_pb2.DispatchChunk) -> None:
        """A fast link announced on this stream: serve it until the stream ends."""
        fast = self.shared.fast
        if fast is None:
            logger.warning("a fast link was announced, but this rank has no fast data plane")
            return
        try:
            cuda_region = msg.cuda_region if msg.HasField("cuda_region") else None
            self._fast_ends.append(fast.attach(msg.fast_link, cuda_region))
        except AsapError as exc:  # the attention rank notices: its link end is never attached
            logger.warning("rejected fast link %s: %s", msg.fast_link.region, exc.message)

    async def _read(self, messages: AsyncIterable[expert_pb2.DispatchChunk], outbound: Outbound) -> None:
        async for msg in messages:
            if msg.HasField("fast_link"):
                self._attach_fast(msg)
                continue
            if msg.HasField("nixl_link"):
                await outbound.put(await self._connect_nixl(msg))
                continue
            await self.accept(msg, outbound)
        await self.finish(outbound)

    async def accept(self, msg: expert_pb2.DispatchChunk | chunks.Dispatch, outbound: Answers) -> None:
        """One dispatch chunk of this stream, answered on ``outbound`` (now, or by a reply task). An
        in-process caller (``asap.sim``) may hand the chunk already decoded, as a ``chunks.Dispatch`` of
        its own tensors: the same handling without the message round trip."""
        shared = self.shared
        serial = None if shared.overlap else shared.serial  # ``async with``, unrolled: no frames per chunk
        if serial is not None:
            await serial.acquire()
        try:
            try:
                dispatch = msg if isinstance(msg, chunks.Dispatch) else shared.decode(msg, self.regions)
                trace = ChunkTrace.start(dispatch) if setup.TRACING_ENABLED else None
                future: asyncio.Future[ExpertResult] | None
                counted: HostedCounts | None = None
                if dispatch.counted is not None:  # an in-process sender's own counts (``asap.sim``)
                    counted = shared.executor.counted(dispatch.layer, dispatch.counted)
                if dispatch.sync is not None:  # checked now, queued after the step barrier
                    if counted is None:
                        counted = shared.executor.check(dispatch.layer, dispatch.expert_ids)
                    future = None
                else:
                    future = await self._submit(dispatch, counted)
            except AsapError as exc:
                logger.warning("rejected chunk mb=%d layer=%d: %s", msg.micro_batch, msg.layer, exc.message)
                await outbound.put(
                    error_reply(msg.micro_batch, msg.layer, msg.row_offset, msg.total_rows, exc)
                )
                return
            if serial is not None and future is not None:
                await self._reply(dispatch, future, trace, outbound)
                return
        finally:
            if serial is not None:
                serial.release()
        loop = asyncio.get_running_loop()
        if future is not None and never_waits(outbound):
            reply = Reply(self, dispatch, future, trace, outbound, loop)
            self._replies.add(reply.done)
            reply.done.add_done_callback(reply.finished)
            loop.call_soon(reply.start)  # the first step of the task it stands for
            return
        task = loop.create_task(self._reply(dispatch, future, trace, outbound, counted))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def finish(self, outbound: Outbound) -> None:
        """The stream ended: wait for the answers still being computed, then end ``outbound``."""
        if self._replies:
            await asyncio.gather(*self._replies)
        await outbound.put(None)

    def _submit(
        self, dispatch: chunks.Dispatch, counted: HostedCounts | None = None
    ) -> Coroutine[Any, Any, asyncio.Future[ExpertResult]]:
        """The executor's ``submit`` of ``dispatch`` (its coroutine, awaited by the caller); ``counted``:
        what the executor's ``check`` returned for it earlier (not checked again)."""
        return self.shared.executor.submit(
            dispatch.layer, dispatch.hidden, dispatch.expert_ids, dispatch.weights, counted=counted
        )

    async def _reply(
        self,
        dispatch: chunks.Dispatch,
        future: asyncio.Future[ExpertResult] | None,
        trace: ChunkTrace | None,
        outbound: Answers,
        counted: HostedCounts | None = None,
    ) -> None:
        shared = self.shared
        loop = asyncio.get_running_loop()
        locked = False
        try:
            try:
                barrier_ns = 0
                if future is None:  # sync: wait for the other attention ranks, then compute together
                    assert dispatch.sync is not None
                    barrier_ns = await shared.barrier.wait(
                        sync=dispatch.sync,
                        layer=dispatch.layer,
                        attention_rank=dispatch.attention_rank,
                        rows=dispatch.rows,
                        total_rows=dispatch.total_rows,
                    )
                    if trace is not None:
                        trace.barrier_done()
                    if not shared.overlap:
                        await shared.serial.acquire()
                        locked = True
                    if dispatch.rows == 0:
                        future = loop.create_future()
                        future.set_result(ExpertResult(dispatch.hidden, 0, 0))
                    else:
                        future = await self._submit(dispatch, counted)
                result = await future
                if trace is not None:
                    trace.computed(result)
                msg = await loop.run_in_executor(shared.codec, self.answer, dispatch, result, barrier_ns)
            except AsapError as exc:
                msg = error_reply(
                    dispatch.micro_batch, dispatch.layer, dispatch.row_offset, dispatch.total_rows, exc
                )
                trace = None
            if shared.profile is not None and dispatch.rows:
                await charge(shared.transfer_s(dispatch.rows, dispatch.attention_rank))
            await outbound.put(msg)
        finally:
            if locked:
                shared.serial.release()
        if trace is not None:
            trace.sent()
