"""The expert rank's end of GPU fast links: slots in the attention rank's CUDA IPC memory, ready flags on
the streams (the attention side and the protocol: ``asap.dataplane.gpu_fast``).

The poll thread takes descriptors and checks them as on CPU ranks (slot, size, flags, slot header, MoE
layer: a malformed one is answered ``InvalidArgument`` and the link goes on). The compute thread then
enqueues, with no host wait: a wait for each request flag, the expert computation straight from the
slots (ids translated to local indices on the device, ``ExpertPart.device_local_ids``), the results over
the rows, each slot's done flag; and publishes the completions at once. The done flag is written for
every answered request of a valid slot, errors too, after any GPU work of it: the attention rank's
stream waits for it before it reuses the slot.

Ids in the slot are only known on the device. An id that is neither -1 nor hosted here is skipped (its
slot contributes nothing) instead of failing the dispatch, and counted on the device (``bad_id_calls``,
read through a pinned copy at most every 0.1 s without blocking, and logged): failing the dispatch would need the host to wait
for the device on every layer, which is what this plane removes.

A link whose peer is gone (stream ended, region retired) is detached with its flags poisoned, so the
compute stream never stays blocked on a request flag a dead attention rank will not write.

Captured steps (``expert_svc.gpu_graph``, on by default, ``ASAP_GPU_STEP_GRAPHS=0`` turns them off): a
dispatch whose rows fall in a captured bucket is enqueued by the poll thread that took its descriptor
(flag wait, two stream writes, one graph launch, the done flag) and answered there, with no hand-off to
the compute thread; the compute thread merges and computes the rest eagerly.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from asap.dataplane.cuda_ipc import CudaAttachments
from asap.dataplane.fastlink import DONE_FLAG_AT, HEARTBEAT_EXPERT, REQUEST_FLAG_AT, Request, SlotHeader, beat
from asap.dataplane.gpu_flags import StreamFlags, driver_flags, poison_value
from asap.dataplane.gpu_layout import GPU_POLL_SPIN_S, gpu_layout_rows
from asap.dataplane.poller import PollThread
from asap.dataplane.ring import Backoff
from asap.errors import AsapError, InternalError, InvalidArgument, Unavailable
from asap.model.grouped import BUCKETS
from asap.telemetry import setup
from asap.v1 import common_pb2, expert_pb2
from expert_svc.core import ExpertExecutor
from expert_svc.fastlane import ExpertLinkEnd, FastLane, _Item, _record_spans
from expert_svc.gpu_graph import (
    StepGraphs,
    StepKey,
    graph_buckets,
    step_graph_rows,
    step_graphs_enabled,
    step_key,
)

__all__ = ["GpuExpertLinkEnd", "GpuFastLane"]

logger = logging.getLogger(__name__)


class GpuExpertLinkEnd(ExpertLinkEnd):
    """One attached GPU fast link: the shared-memory region (rings, headers) and the slots' GPU memory."""

    lane: GpuFastLane

    def __init__(
        self, lane: GpuFastLane, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion
    ) -> None:
        self._attachments = CudaAttachments()
        self._attachments.announce(cuda_region)
        self.slots_buf = self._attachments.buffer(cuda_region.name)
        self._last_seq = 0
        self._poisoned = False
        self.buckets: tuple[int, ...] = ()
        self.graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        """The captured steps of this link's slots (``expert_svc.gpu_graph``), made before it is served."""
        try:
            super().__init__(lane, link)
        except BaseException:
            self._attachments.close()
            raise
        if int(self.slots_buf.numel()) < self.geometry.device_nbytes:
            self._close()
            raise InvalidArgument(
                f"fast link GPU memory of {self.slots_buf.numel()} bytes for slots of {self.geometry.device_nbytes}"
            )
        steps = lane.steps
        if steps is not None:
            try:
                started = time.monotonic()
                self.buckets = graph_buckets(self.geometry, steps.largest)
                self.graphs = steps.capture(self.slots_buf, self.geometry, self.buckets, self._beat)
                logger.info(
                    "GPU fast link: %d expert steps captured (buckets %s) in %.0f ms",
                    len(self.graphs),
                    list(self.buckets),
                    (time.monotonic() - started) * 1e3,
                )
            except Exception:  # the eager path serves the link: slower, never wrong
                logger.exception("capturing the expert steps of a GPU fast link failed; eager steps")
                self.buckets, self.graphs = (), {}

    def _beat(self) -> None:
        """The heartbeat while the steps are captured (the poll thread does not serve the link yet)."""
        beat(self._buf, HEARTBEAT_EXPERT, time.monotonic_ns())

    def _take(self, request: Request, now_ns: int) -> None:
        item = self._admit(request, lambda: self._item(request, now_ns))
        if item is None:
            return
        if request.not_before_ns > now_ns:
            self._delayed.hold(item)
        elif not self.lane.step(item):
            self.lane.enqueue(item)

    def flag(self, slot: int, at: int) -> int:
        return int(self.slots_buf.data_ptr()) + self.geometry.device_slot_at(slot) + at

    def _view(self, slot: int, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
        start = self.geometry.device_slot_at(slot) + offset
        nbytes = dims[0] * dims[1] * dtype.itemsize
        return self.slots_buf[start : start + nbytes].view(dtype).view(dims)

    def _item(self, request: Request, now_ns: int) -> _Item:
        g = self.geometry
        request.check(g)
        if request.shape_only:
            raise InvalidArgument("a dispatch without row values on a GPU fast link")
        header = SlotHeader.read(self._buf, g.slot_at(request.slot), request)
        self.lane.check_layer(request.layer)
        self._last_seq = max(self._last_seq, request.seq)
        rows, top_k = request.rows, g.top_k
        hidden_at, ids_at, weights_at, _ = g.payload(gpu_layout_rows(g, rows), shape_only=False)
        return _Item(
            self,
            request,
            header,
            request.layer,
            self._view(request.slot, hidden_at, self.lane.dtype, [rows, g.hidden_size]),
            self._view(request.slot, ids_at, torch.int32, [rows, top_k]),
            self._view(request.slot, weights_at, torch.float32, [rows, top_k]),
            time.time_ns(),
            now_ns,
        )

    def _write_back(self, request: Request, out: torch.Tensor | None, valid_slot: bool) -> None:
        if not valid_slot or self._poisoned:
            return
        stream = self.lane.stream
        g = self.geometry
        if out is not None and request.rows:
            hidden_at = g.payload(request.rows, shape_only=False)[0]
            with torch.cuda.stream(stream):
                dst = self._view(request.slot, hidden_at, self.lane.dtype, [request.rows, g.hidden_size])
                dst.copy_(out, non_blocking=True)
        self.lane.flags.write(stream, self.flag(request.slot, DONE_FLAG_AT), request.seq)

    def poison(self) -> None:
        """Release the compute stream from waits on this link's request flags (and the peer's streams
        from its done flags): its peer is gone or retired the region."""
        with self._lock:
            if self._poisoned or self._closed:
                return
            self._poisoned = True
        value = poison_value(self._last_seq)
        stream = self.lane.poison_stream
        for slot in range(self.geometry.slots):
            self.lane.flags.write(stream, self.flag(slot, REQUEST_FLAG_AT), value)
            self.lane.flags.write(stream, self.flag(slot, DONE_FLAG_AT), value)

    def detach(self) -> None:
        self.poison()
        super().detach()

    def _close(self) -> None:
        super()._close()
        self.lane.retire(self.graphs)  # launches may still be queued on the stream
        self.graphs = {}
        self.slots_buf = torch.empty(0, dtype=torch.uint8)
        self._attachments.close()


class GpuFastLane(FastLane):
    """All GPU fast links of one expert rank (``warm`` on the compute thread before SERVING)."""

    device_slots = True

    def __init__(
        self, executor: ExpertExecutor, *, max_merge_rows: int = 16384, flags: StreamFlags | None = None
    ) -> None:
        super().__init__(executor, shape_only=False, max_merge_rows=max_merge_rows)
        self.poller = PollThread(  # not started yet: it spins before parking (GPU hosts have cores)
            "gpu-fast-requests", flush=self._flush, backoff=lambda: Backoff(spin_s=GPU_POLL_SPIN_S)
        )
        self.device = executor.part.device
        self.flags = flags if flags is not None else driver_flags()
        self.stream = torch.cuda.current_stream(self.device)
        """The compute thread's stream (set by ``warm``, which runs there)."""
        self.poison_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._bad_calls = torch.zeros((), dtype=torch.int64, device=self.device)
        self._pinned = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._reading: torch.cuda.Event | None = None
        self._read_at = 0.0
        self._checks_lock = threading.Lock()
        self.bad_id_calls = 0
        """Computations in which some id was neither -1 nor hosted here (those slots were skipped)."""
        self.steps: StepGraphs | None = None
        """The captured step (set by ``warm`` when on and supported; None: every step eager)."""
        self.graph_steps = 0
        """Dispatches answered by a captured step."""
        self._launch_lock = threading.Lock()
        self._retired: list[tuple[torch.cuda.Event, object]] = []

    def check_layer(self, layer: int) -> None:
        if layer not in self._moe_layers:
            raise InvalidArgument(f"layer {layer} is not an MoE layer of this model")

    def _end(self, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion | None) -> ExpertLinkEnd:
        if cuda_region is None:
            raise InvalidArgument("a GPU fast link announced without its slots' GPU memory")
        return GpuExpertLinkEnd(self, link, cuda_region)

    def warm(self) -> None:
        """On the compute thread: take its stream and run every kernel and driver call of this path once
        (CUDA loads modules lazily; a first load while a stream waits on a flag can hang, DESIGN §9)."""
        dev = self.device
        self.stream = torch.cuda.current_stream(dev)
        part = self.executor.part
        scratch = torch.zeros(2 * 64, dtype=torch.uint8, device=dev)
        self.flags.write(self.stream, int(scratch.data_ptr()), 1)
        self.flags.wait(self.stream, int(scratch.data_ptr()), 1)
        ids = torch.full((4, self.top_k), -1, dtype=torch.int32, device=dev)
        ids[:, 0] = self._hosts[0]
        local, bad = part.device_local_ids(ids)
        self._watch(bad)
        rows = torch.zeros(4, self.hidden_size, dtype=self.dtype, device=dev)
        weights = torch.zeros(4, self.top_k, dtype=torch.float32, device=dev)
        layer = part.config.moe_layer_ids[0]
        out = part.compute_local(layer, torch.cat([rows, rows])[4:], local, weights)  # cat: merged groups
        view = scratch[:64].view(self.dtype)[: min(32, self.hidden_size)]
        view.copy_(out[0, : view.numel()], non_blocking=True)
        self._read_at = 0.0
        self._collect()  # the pinned copy and the event, once
        self.stream.synchronize()
        if step_graphs_enabled() and StepGraphs.supported(part):
            steps = StepGraphs(part, self._bad_calls, largest=step_graph_rows())
            steps.warm([b for b in BUCKETS if b <= steps.largest])
            self.steps = steps

    def step(self, item: _Item) -> bool:
        """On the poll thread: enqueue ``item``'s captured step and answer it; False if it has none (the
        compute thread then takes it)."""
        steps, end, request = self.steps, item.end, item.request
        if steps is None or not isinstance(end, GpuExpertLinkEnd) or not end.graphs:
            return False
        window, inner = steps.locate(request.layer)
        key = step_key(end.geometry, end.buckets, request.slot, request.rows, window)
        graph = end.graphs.get(key) if key is not None else None
        if graph is None:
            return False
        started, started_unix = time.monotonic_ns(), time.time_ns()
        error: AsapError | None = None
        try:
            if end._poisoned:
                raise Unavailable("the fast link was retired (its peer is gone)")
            stream = self.stream
            with self._launch_lock, torch.cuda.stream(stream):
                self._collect()
                self.flags.wait(stream, end.flag(request.slot, REQUEST_FLAG_AT), request.seq)
                self.flags.write(stream, steps.rows_at, request.rows)
                self.flags.write(stream, steps.inner_at, inner)
                graph.replay()
        except AsapError as exc:
            error = exc
        except Exception as exc:  # a failed launch fails its dispatch, never the rank
            logger.exception("captured expert step failed for layer %d", request.layer)
            error = InternalError(f"expert compute failed: {exc}")
        compute_ns = time.monotonic_ns() - started
        if error is None:
            stats = self.executor.stats
            stats.calls += 1
            stats.busy_ns += compute_ns
            stats.chunks += 1
            stats.rows += request.rows
            self.graph_steps += 1
        end.answer(  # the done flag after the graph (same stream), then the completion
            request,
            None,
            error=error,
            queue_ns=started - item.picked_ns,
            compute_ns=compute_ns,
            picked_unix_ns=item.picked_unix_ns,
        )
        if error is None and setup.TRACING_ENABLED:
            _record_spans(item, started_unix, compute_ns, time.time_ns())
        item.hidden = item.expert_ids = item.weights = torch.empty(0)
        end.release()
        return True

    def retire(self, graphs: object) -> None:
        """Keep a closed link's graphs until the stream has passed its queued launches."""
        with self._launch_lock:
            self._retired = [(e, g) for e, g in self._retired if not e.query()]  # type: ignore[no-untyped-call]
            if graphs:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self.stream)
                self._retired.append((event, graphs))

    def _watch(self, bad: torch.Tensor) -> None:
        """Count on the device whether ``bad`` [N, K] has any id set (read later by ``_collect``)."""
        self._bad_calls.add_(bad.any())

    def _collect(self) -> None:
        """Read the device count of computations with ids not hosted here, at most every 0.1 s, through a
        pinned copy whose event is only queried (never waits)."""
        now = time.monotonic()
        with self._checks_lock:
            if self._reading is not None:
                if not self._reading.query():  # type: ignore[no-untyped-call]
                    return
                self._reading = None
                seen = int(self._pinned[0])
                if seen > self.bad_id_calls:
                    logger.warning(
                        "%d GPU fast computations carried expert ids not hosted here (skipped)",
                        seen - self.bad_id_calls,
                    )
                    self.bad_id_calls = seen
            if now - self._read_at < 0.1:
                return
            self._read_at = now
            self._pinned.copy_(self._bad_calls.view(1), non_blocking=True)
            self._reading = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._reading.record(torch.cuda.current_stream(self.device))

    def _run_group(self, group: list[_Item]) -> tuple[list[torch.Tensor], int]:
        started = time.monotonic_ns()
        self._collect()
        stream = self.stream = torch.cuda.current_stream(self.device)  # the compute thread's
        for item in group:
            end = item.end
            if not isinstance(end, GpuExpertLinkEnd):
                raise InternalError("a host-slot item on the GPU fast lane")
            self.flags.wait(stream, end.flag(item.request.slot, REQUEST_FLAG_AT), item.request.seq)
        part = self.executor.part
        if len(group) == 1:
            hidden, ids, weights = group[0].hidden, group[0].expert_ids, group[0].weights
        else:  # slots of several attention ranks (maybe other GPUs): onto this rank's device
            hidden = torch.cat([i.hidden.to(self.device) for i in group])
            ids = torch.cat([i.expert_ids.to(self.device) for i in group])
            weights = torch.cat([i.weights.to(self.device) for i in group])
        local, bad = part.device_local_ids(ids)
        self._watch(bad)
        out = part.compute_local(group[0].layer, hidden, local, weights)
        outs = [out] if len(group) == 1 else list(torch.split(out, [i.request.rows for i in group]))
        compute_ns = time.monotonic_ns() - started
        stats = self.executor.stats
        stats.calls += 1
        stats.busy_ns += compute_ns
        stats.chunks += len(group)
        stats.rows += sum(i.request.rows for i in group)
        return outs, compute_ns
