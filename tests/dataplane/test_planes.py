"""The stream-carried data planes (asap.dataplane.planes) against a fake expert rank on a fake call:
the round trip, counters, errors, a broken stream, and slots kept for late answers. No grpc."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from asap.dataplane.link import Slots
from asap.dataplane.plane import LinkSpec, PlaneRequest
from asap.dataplane.planes import ExchangeStream, ShmPlane, StreamPlane, make_plane
from asap.dataplane.shm import ShmAttachments, SlotAllocator
from asap.errors import InvalidArgument, ResourceExhausted, Unavailable
from asap.model.placement import RankDispatch
from asap.rpc.duplex import DuplexStream
from asap.syncstep import SyncStep
from asap.v1 import expert_pb2
from asap.wire import chunks
from expert_svc.core import ExpertResult
from expert_svc.regions import StreamRegions

H, K = 16, 2


class FakeExpert:
    """An expert rank on one stream: answers each chunk with twice its rows (written back into the
    region when they came by reference), an error for micro-batch 666, nothing for micro-batch 777."""

    def __init__(
        self,
        requests: AsyncIterator[expert_pb2.DispatchChunk],
        shm: ShmAttachments | None,
        holding: asyncio.Event | None = None,
    ) -> None:
        self.regions = StreamRegions(shm, None)
        self.holding = holding if holding is not None else asyncio.Event()
        """Set once a micro-batch 777 chunk is held unanswered."""
        self.seen: list[expert_pb2.DispatchChunk] = []
        self.held: list[chunks.Dispatch] = []
        self._answers: asyncio.Queue[expert_pb2.CombineChunk | Exception] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[expert_pb2.DispatchChunk]) -> None:
        async for msg in requests:
            self.seen.append(msg)
            dispatch = chunks.decode_dispatch(
                msg, hidden_size=H, dtype=torch.float32, num_layers=4, num_experts=8, top_k=K,
                refs=self.regions.decode if self.regions.enabled else None,
            )  # fmt: skip
            if msg.micro_batch == 666:
                code = ResourceExhausted.code
                answer = chunks.error_combine(
                    666, msg.layer, msg.row_offset, msg.total_rows, code, "queue full"
                )
                self._answers.put_nowait(answer)
            elif msg.micro_batch == 777:
                self.held.append(dispatch)
                self.holding.set()
            else:
                self.answer(dispatch)

    def answer(self, dispatch: chunks.Dispatch) -> None:
        result = ExpertResult(dispatch.hidden * 2, 0, 0)
        self._answers.put_nowait(self.regions.answer(dispatch, result, 0))

    def fail(self, exc: Exception) -> None:
        self._answers.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[expert_pb2.CombineChunk]:
        while True:
            item = await self._answers.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self) -> bool:
        self._reader.cancel()
        return True


class Link:
    """A plane over a DuplexStream whose calls are fake expert ranks (as ExpertLink wires it)."""

    def __init__(self, name: str, codec: ThreadPoolExecutor, *, max_chunk_bytes: int = 1 << 20) -> None:
        self.experts: list[FakeExpert] = []
        self.holding = asyncio.Event()
        """Set once an expert of this link holds a chunk unanswered."""
        self.dropped = asyncio.Event()
        """Set once an answer arrived for a dispatch nobody waits for any more."""
        self.shm = ShmAttachments() if name == "shm" else None
        self.stream: ExchangeStream = DuplexStream(
            self._open,
            key_of=lambda m: (m.micro_batch, m.layer),
            peer="expert rank 0 at fake",
            on_open=lambda: self.plane.stream_opened(),
            on_unmatched=self._dropped,
            on_broken=lambda _e, _n: self.plane.stream_ended(),
        )
        spec = LinkSpec(0, 0, H, torch.float32, torch.device("cpu"), max_chunk_bytes, region_bytes=1 << 20)
        self.plane = make_plane(name, spec, self.stream, codec)

    def _open(self, requests: AsyncIterator[expert_pb2.DispatchChunk]) -> FakeExpert:
        expert = FakeExpert(requests, self.shm, self.holding)
        self.experts.append(expert)
        return expert

    def _dropped(self, key: tuple[int, int], _msg: expert_pb2.CombineChunk) -> None:
        self.plane.answer_dropped(key)
        self.dropped.set()

    async def close(self) -> None:
        await self.stream.close()
        self.plane.close()
        if self.shm is not None:
            self.shm.close()


def _dispatch(rows: int, seed: int = 0) -> RankDispatch:
    g = torch.Generator().manual_seed(seed)
    return RankDispatch(
        rank=0,
        rows=torch.arange(rows),
        hidden=torch.randn(rows, H, generator=g),
        expert_ids=torch.randint(0, 8, (rows, K), generator=g, dtype=torch.int32),
        weights=torch.rand(rows, K, generator=g),
    )


@pytest.fixture
def codec() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool  # type: ignore[misc]
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", ["grpc", "shm"])
async def test_round_trip_and_counters(name: str, codec: ThreadPoolExecutor) -> None:
    link = Link(name, codec, max_chunk_bytes=600)  # several chunks per dispatch
    try:
        dispatch = _dispatch(20)
        sent: list[int] = []
        request = PlaneRequest(1, 2, dispatch, SyncStep(5, 1), sent=lambda: sent.append(1))
        result = await link.plane.exchange(request)
        torch.testing.assert_close(result.hidden, dispatch.hidden * 2)
        assert sent == [1]
        (expert,) = link.experts
        assert len(expert.seen) > 1
        assert {(c.step, c.sync_participants) for c in expert.seen} == {(5, 1)}
        stats = link.plane.stats
        payload = 20 * H * 4
        if name == "shm":
            assert (stats.region_hidden_bytes, stats.inline_hidden_bytes) == (payload, 0)
            assert stats.result_ref_bytes == payload
            assert all(c.hidden.HasField("shm") for c in expert.seen)
        else:
            assert (stats.region_hidden_bytes, stats.inline_hidden_bytes, stats.result_ref_bytes) == (
                0,
                payload,
                0,
            )
    finally:
        await link.close()


async def test_an_error_answer_fails_only_its_dispatch(codec: ThreadPoolExecutor) -> None:
    link = Link("grpc", codec)
    try:
        with pytest.raises(ResourceExhausted, match="queue full"):
            await link.plane.exchange(PlaneRequest(666, 0, _dispatch(3)))
        ok = await link.plane.exchange(PlaneRequest(1, 0, _dispatch(3, seed=1)))
        assert ok.hidden.shape == (3, H) and len(link.experts) == 1  # same stream
    finally:
        await link.close()


async def test_a_broken_stream_fails_the_waiting_dispatch_and_the_next_opens_a_new_one(
    codec: ThreadPoolExecutor,
) -> None:
    link = Link("shm", codec)
    try:
        waiting = asyncio.create_task(link.plane.exchange(PlaneRequest(777, 0, _dispatch(4))))
        await asyncio.wait_for(link.holding.wait(), 30)
        link.experts[0].fail(ConnectionError("peer gone"))
        with pytest.raises(Unavailable, match="expert rank 0 at fake"):
            await waiting
        regions = link.plane.regions  # type: ignore[attr-defined]
        assert regions.in_quarantine == 0 and regions.bytes_in_use == 0  # the stream ended: slots freed
        again = await link.plane.exchange(PlaneRequest(1, 0, _dispatch(4, seed=2)))
        assert again.hidden.shape == (4, H) and len(link.experts) == 2
    finally:
        await link.close()


async def test_an_abandoned_dispatch_keeps_its_slots_until_the_late_answer(codec: ThreadPoolExecutor) -> None:
    link = Link("shm", codec)
    try:
        plane = link.plane
        assert isinstance(plane, ShmPlane) and plane.regions is not None
        task = asyncio.create_task(plane.exchange(PlaneRequest(777, 0, _dispatch(4))))
        await asyncio.wait_for(link.holding.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert plane.regions.in_quarantine == 1 and plane.stats.quarantined == 1
        link.experts[0].answer(link.experts[0].held.pop())  # the late answer
        await asyncio.wait_for(link.dropped.wait(), 30)
        assert plane.regions.in_quarantine == 0 and plane.regions.bytes_in_use == 0
    finally:
        await link.close()


async def test_a_dispatch_cancelled_while_its_rows_are_placed_frees_every_slot(
    codec: ThreadPoolExecutor,
) -> None:
    """The codec thread cannot be stopped: a dispatch cancelled while it places rows releases its slots only
    once the placing has ended, so a slot taken after the cancellation is not left taken for good."""
    link = Link("shm", codec)
    try:
        plane = link.plane
        assert isinstance(plane, ShmPlane) and plane.regions is not None
        entered, release = threading.Event(), threading.Event()
        take = plane._take

        class SlowAllocator:
            """Takes slots of the link's allocator, only once released."""

            def __init__(self, inner: SlotAllocator) -> None:
                self.inner = inner

            def alloc(self, nbytes: int) -> int | None:
                entered.set()
                release.wait(30)
                return self.inner.alloc(nbytes)

            def free(self, offset: int) -> None:
                self.inner.free(offset)

        def slow_take() -> Slots | None:
            slots = take()
            assert slots is not None
            slots.allocator = SlowAllocator(slots.allocator)  # type: ignore[assignment]
            return slots

        plane._take = slow_take  # type: ignore[method-assign]
        task = asyncio.create_task(plane.exchange(PlaneRequest(1, 0, _dispatch(4))))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the codec thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert plane.regions.in_quarantine == 0 and plane.regions.bytes_in_use == 0
        assert not link.experts or not link.experts[0].seen  # nothing was sent
        plane._take = take  # type: ignore[method-assign]
        again = await plane.exchange(PlaneRequest(2, 0, _dispatch(4, seed=1)))
        assert again.hidden.shape == (4, H) and plane.regions.bytes_in_use == 0
    finally:
        release.set()
        await link.close()


def test_make_plane_knows_the_three_planes_and_refuses_others(codec: ThreadPoolExecutor) -> None:
    spec = LinkSpec(0, 0, H, torch.float32, torch.device("cpu"), 1 << 20)
    stream: ExchangeStream = DuplexStream(lambda r: FakeExpert(r, None), key_of=lambda m: (0, 0), peer="x")
    plane = make_plane("grpc", spec, stream, codec)
    assert type(plane) is StreamPlane and plane.name == "grpc"
    with pytest.raises(InvalidArgument, match="no data plane 'rdma'"):
        make_plane("rdma", spec, stream, codec)
