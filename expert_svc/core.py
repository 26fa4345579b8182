"""Expert-rank executor: a bounded work queue in front of one compute thread. No grpc here.

Receiving, queueing, computing and sending proceed concurrently: the event loop receives and decodes
chunks and submits them here; a worker task takes everything waiting, merges chunks of the same layer
into one expert call (rows from several attention ranks computed together), and runs the torch work on a
dedicated thread so the loop stays free to receive and send meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import torch

from asap import clock
from asap.devices import ready_event, use_own_stream
from asap.errors import InternalError, InvalidArgument, Unavailable
from asap.model.expert_part import ExpertPart
from asap.model.hosted import HostedCounts, HostedIds, add_counts
from asap.model.meta import meta_empty
from asap.warmup import plan_expert_warmup, warm_expert_part

logger = logging.getLogger(__name__)

_R = TypeVar("_R")


@dataclass(slots=True)
class ExpertResult:
    """Weighted expert output for the rows of one submitted chunk."""

    hidden: torch.Tensor  # [n, H]
    queue_ns: int
    compute_ns: int
    ready: torch.cuda.Event | None = None
    """CUDA: recorded on the compute stream after ``hidden`` was computed (wait for it before reading)."""
    started: torch.cuda.Event | None = None
    """CUDA: recorded before the computation; ``device_compute_ns`` measures from it to ``ready``."""

    def device_compute_ns(self) -> int:
        """Compute time on the device (CUDA: between the events, once ``ready`` has passed), else host."""
        if self.started is None or self.ready is None:
            return self.compute_ns
        return int(self.started.elapsed_time(self.ready) * 1e6)


_Events = tuple[torch.cuda.Event | None, torch.cuda.Event | None]


class Rows(Protocol):
    """One unit of expert work: rows of one layer with their routing."""

    @property
    def layer(self) -> int: ...
    @property
    def hidden(self) -> torch.Tensor: ...  # [n, H]
    @property
    def expert_ids(self) -> torch.Tensor: ...  # [n, K]
    @property
    def weights(self) -> torch.Tensor: ...  # [n, K]


@dataclass(slots=True)
class _Work:
    layer: int
    hidden: torch.Tensor  # [n, H]
    expert_ids: torch.Tensor  # [n, K]
    weights: torch.Tensor  # [n, K]
    future: asyncio.Future[ExpertResult]
    counted: HostedCounts | None = None
    """What ``check`` counted of ``expert_ids`` (handed to the part: it does not check them again)."""
    enqueued_ns: int = field(default_factory=clock.monotonic_ns)


@dataclass(slots=True)
class ExpertStats:
    chunks: int = 0
    rows: int = 0
    calls: int = 0
    busy_ns: int = 0


class ExpertExecutor:
    """Queue + compute thread of one expert rank. ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        part: ExpertPart,
        *,
        queue_depth: int = 256,
        max_merge_rows: int = 16384,
        compute: Executor | None = None,
    ) -> None:
        """``compute``: where computations run, one at a time in order; default a thread of its own
        (``asap simulate`` passes a virtual device, whose work takes modelled time on a virtual clock)."""
        self.part = part
        self.max_merge_rows = max_merge_rows
        self.stats = ExpertStats()
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(maxsize=queue_depth)
        self._thread: Executor = compute or ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="expert-compute",
            initializer=use_own_stream,
            initargs=(part.device,),
        )
        self._worker: asyncio.Task[None] | None = None
        self._hosted = np.zeros(part.config.num_experts + 1, dtype=np.bool_)
        self._hosted[list(part.hosted)] = True
        self._hosted[-1] = True  # index -1: a slot for another rank
        self._hosted_ids = HostedIds(part.hosted, part.config.num_experts)
        self._moe_layers = set(part.config.moe_layer_ids)
        self._compute_counted: Callable[..., torch.Tensor] | None = getattr(part, "compute_counted", None)
        """The part's ``compute`` of checked ids with their counts (``ExpertPart``'s; a stand-in part
        without it, a test's, gets ``compute``)."""
        self._taken: list[_Work] = []  # taken off the queue by the worker, not yet answered
        self._closed = False
        self._compute_lock = threading.Lock()

    @property
    def queued_chunks(self) -> int:
        """Chunks waiting in the queue for the compute thread (the fast plane's wait in ``FastLane``)."""
        return self._queue.qsize()

    @property
    def has_room(self) -> bool:
        """Whether ``submit`` queues at once (the queue is not full: it would not wait for room)."""
        return not self._queue.full()

    async def start(self) -> None:
        if self._worker is not None:
            raise InternalError("ExpertExecutor started twice")
        self._worker = asyncio.create_task(self._run(), name="expert-worker")

    async def stop(self) -> None:
        """Stop accepting work, fail what is still queued, and release the compute thread."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        unanswered = self._taken
        self._taken = []
        while not self._queue.empty():
            unanswered.append(self._queue.get_nowait())
        for work in unanswered:
            if not work.future.done():
                work.future.set_exception(Unavailable("expert rank is shutting down"))
        self._thread.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until everything queued so far has been computed."""
        await self._queue.join()

    async def prepare(self) -> int:
        """Capture the part's CUDA graphs for every batch size up to ``max_merge_rows`` now, on the compute
        thread (its stream replays them later); returns how many were captured (0 without graphs)."""
        loop = asyncio.get_running_loop()
        if self.part.device.type == "cuda":  # also the eager row counts Triton specialises on
            plan = plan_expert_warmup(self.max_merge_rows)
            return await loop.run_in_executor(self._thread, warm_expert_part, self.part, plan)
        return await loop.run_in_executor(self._thread, self.part.prepare, self.max_merge_rows)

    def validate(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Reject work this rank cannot do, before it is queued (so one bad chunk never spoils a merge)."""
        self.check(layer, expert_ids)

    def check(self, layer: int, expert_ids: torch.Tensor) -> HostedCounts | None:
        """``validate``, returning the ids' rows per hosted expert when the check counted them
        (``HostedIds.counts``: CPU int32 ids of a contiguous block, what the planes deliver), else None:
        the one check of a dispatch's ids, whose counts go with the work to the part
        (``ExpertPart.compute_counted``), which then does not check them again."""
        if layer not in self._moe_layers:
            raise InvalidArgument(f"layer {layer} is not an MoE layer of this model")
        # what the planes deliver (CPU int32): a reduction and a count (``HostedIds``); anything else,
        # or a bad id, takes the checks below, whose messages say what is wrong
        if expert_ids.dtype is torch.int32 and expert_ids.is_cpu:
            counted = self._hosted_ids.counts(expert_ids.numpy())
            if counted is not None:
                return counted
        # numpy on the host: the routing table is small, and a torch op's dispatch costs more than its work
        ids = expert_ids.detach().to("cpu").numpy().astype(np.int64, copy=False)
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= self.part.config.num_experts):
            raise InvalidArgument(
                f"expert ids must be in [-1, {self.part.config.num_experts}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        if ids.size and not bool(self._hosted[ids].all()):
            bad = sorted({int(i) for i in ids.ravel().tolist() if i >= 0 and not self._hosted[i]})
            raise InvalidArgument(
                f"experts {bad} are not hosted by this rank (hosts {list(self.part.hosted)})"
            )
        return None

    def counted(self, layer: int, counted: HostedCounts) -> HostedCounts | None:
        """``check``'s answer for ids an in-process sender counted itself (``chunks.Dispatch.counted``,
        from ``split_by_rank(count=True)``): the layer is checked, the ids are trusted. None when the
        counts do not fit this rank's block (not a contiguous one, or not of its length): ``check``."""
        if layer not in self._moe_layers:
            raise InvalidArgument(f"layer {layer} is not an MoE layer of this model")
        hosted = self._hosted_ids
        if not hosted.contiguous or len(counted[0]) != hosted.high - hosted.low:
            return None
        return counted

    async def submit(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        *,
        counted: HostedCounts | None = None,
    ) -> asyncio.Future[ExpertResult]:
        """Queue one chunk; waits while the queue is full (backpressure). Returns the result's future.

        ``counted``: what ``check`` returned for these very ids (a caller that checked them before, the
        step barrier's sync path): not checked again; None, they are checked here."""
        if self._closed:
            raise Unavailable("expert rank is shutting down")
        if counted is None:
            counted = self.check(layer, expert_ids)
        future: asyncio.Future[ExpertResult] = asyncio.get_running_loop().create_future()
        work = _Work(layer, hidden, expert_ids, weights, future, counted)
        if self._queue.full():
            await self._queue.put(work)
        else:  # what ``put`` does when there is room, without its coroutine
            self._queue.put_nowait(work)
        return future

    async def on_compute_thread(self, fn: Callable[[], _R]) -> _R:
        """``fn()`` on the compute thread, awaited (warm-ups that need the thread's own stream)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def run_on_compute_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the compute thread, behind what is queued there; callable from any thread, no
        event loop involved (the fast plane's poll thread feeds the compute thread this way)."""
        if self._closed:
            raise Unavailable("expert rank is shutting down")
        self._thread.submit(fn)

    def run_inline(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the calling thread now (a fast lane computing where it took its descriptors);
        ``Unavailable`` once the executor is stopping, as ``run_on_compute_thread``."""
        if self._closed:
            raise Unavailable("expert rank is shutting down")
        fn()

    def compute_rows(
        self, group: Sequence[Rows], out: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], int]:
        """One computation over ``group`` (same layer), its outputs per item and the host time it took;
        counted in ``stats`` as the queued path counts its own. On the compute thread, or on any thread
        for a part without a device (computations never overlap: they hold one lock). ``out`` ([rows of
        the group, H]): computed there (``ExpertPart.compute_into``), the outputs are views of it."""
        outs, compute_ns, _ = self._compute(group, out)
        self.stats.calls += 1
        self.stats.busy_ns += compute_ns
        self.stats.chunks += len(group)
        self.stats.rows += sum(int(out.shape[0]) for out in outs)
        return outs, compute_ns

    def _take_waiting(self, first: _Work) -> list[list[_Work]]:
        """Everything waiting now, grouped by layer (first-arrival order), each group within max rows."""
        if self._queue.empty():  # the usual case: one chunk
            return [[first]]
        groups: dict[int, list[list[_Work]]] = {}
        order: deque[list[_Work]] = deque()

        def place(work: _Work) -> None:
            bucket = groups.setdefault(work.layer, [])
            if (
                bucket
                and sum(w.hidden.shape[0] for w in bucket[-1]) + work.hidden.shape[0] <= self.max_merge_rows
            ):
                bucket[-1].append(work)
                return
            group = [work]
            bucket.append(group)
            order.append(group)

        place(first)
        while not self._queue.empty():
            place(self._queue.get_nowait())
        return list(order)

    def _compute(
        self, group: Sequence[Rows], out: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], int, _Events]:
        with self._compute_lock:  # the fast plane's poll thread may compute too (emulated compute)
            return self._compute_locked(group, out)

    def _compute_locked(
        self, group: Sequence[Rows], out: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], int, _Events]:
        start = clock.monotonic_ns()
        started = ready_event(self.part.device, timing=True)
        if len(group) == 1:
            w = group[0]
            counted = getattr(w, "counted", None)  # queued work (``_Work``); a fast lane's rows: none
            outs = [self._part_compute(w.layer, w.hidden, w.expert_ids, w.weights, out, counted)]
        else:
            # Rows may lie in regions of different GPUs (CUDA IPC from several attention ranks): bring them
            # to this rank's device first.
            hidden = _merged_rows([w.hidden for w in group], self.part.device)  # [sum n, H]
            ids = torch.cat([w.expert_ids for w in group])
            weights = torch.cat([w.weights for w in group])
            counted = add_counts([getattr(w, "counted", None) for w in group])
            merged = self._part_compute(group[0].layer, hidden, ids, weights, out, counted)
            outs = list(torch.split(merged, [w.hidden.shape[0] for w in group]))
        # Compute time is host time: on CUDA the kernels may still run; ``ready`` marks their end.
        return outs, clock.monotonic_ns() - start, (started, ready_event(self.part.device, timing=True))

    def _part_compute(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None,
        counted: HostedCounts | None = None,
    ) -> torch.Tensor:
        if out is None:
            if counted is not None and self._compute_counted is not None:
                return self._compute_counted(layer, hidden, ids, weights, counted)
            return self.part.compute(layer, hidden, ids, weights)
        return self.part.compute_into(layer, hidden, ids, weights, out)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            # what ``get`` does when something is queued, without its coroutine
            first = queue.get_nowait() if not queue.empty() else await queue.get()
            groups = self._take_waiting(first)
            self._taken = [work for group in groups for work in group]
            for group in groups:
                started = clock.monotonic_ns()
                live = [w for w in group if not w.future.cancelled()]
                try:
                    if live:
                        outs, compute_ns, (started_ev, ready) = await loop.run_in_executor(
                            self._thread, self._compute, live
                        )
                        self.stats.calls += 1
                        self.stats.busy_ns += compute_ns
                        for work, out in zip(live, outs, strict=True):
                            self.stats.chunks += 1
                            self.stats.rows += out.shape[0]
                            if not work.future.done():
                                work.future.set_result(
                                    ExpertResult(
                                        out, started - work.enqueued_ns, compute_ns, ready, started_ev
                                    )
                                )
                except Exception as exc:  # a failed computation fails its chunks, never the rank
                    logger.exception("expert computation failed for layer %d", group[0].layer)
                    error = (
                        exc
                        if isinstance(exc, InvalidArgument)
                        else InternalError(f"expert compute failed: {exc}")
                    )
                    for work in live:
                        if not work.future.done():
                            work.future.set_exception(error)
                finally:
                    for _ in group:
                        self._queue.task_done()


def _merged_rows(rows: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.cat`` of a group's hidden rows on ``device``. Shape-only (meta) rows of one dtype and width:
    a new meta tensor of the merged shape, which is what ``cat`` makes of them, without its way there
    (torch's Python decompositions for meta tensors: ~150 µs a merge, and ~2 s for the first, which
    imports ``torch._dynamo``)."""
    first = rows[0]
    if device.type == "meta" and all(
        r.device.type == "meta" and r.dtype == first.dtype and r.shape[1:] == first.shape[1:] for r in rows
    ):
        return meta_empty((sum(int(r.shape[0]) for r in rows), *first.shape[1:]), first.dtype)
    return torch.cat([r.to(device) for r in rows])
