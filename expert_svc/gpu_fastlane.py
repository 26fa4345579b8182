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
slot contributes nothing) instead of failing the dispatch, and counted on the device (``bad_ids``,
read through a pinned copy at most every 0.1 s without blocking, and logged): failing the dispatch would need the host to wait
for the device on every layer, which is what this plane removes.

A link whose peer is gone (stream ended, region retired) is detached with its flags poisoned, so the
compute stream never stays blocked on a request flag a dead attention rank will not write.

Captured steps (``expert_svc.gpu_graph``, on by default, ``ASAP_GPU_STEP_GRAPHS=0`` turns them off): a
dispatch whose rows fall in a captured bucket is enqueued by the poll thread that took its descriptor
(flag wait, one graph launch, the done flag) and answered there, with no hand-off to the compute thread;
the compute thread merges and computes the rest eagerly. Armed steps (``gpu_link_end``, default on):
the step of each slot's next dispatch is already enqueued, waiting on the request flag, so the
descriptor's arrival only confirms it (``armed_hits``) or launches the right bucket behind it
(``armed_misses``); the GPU starts computing when the attention stream writes the flag.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from asap.dataplane.fastlink import REQUEST_FLAG_AT
from asap.dataplane.gpu_flags import StreamFlags, driver_flags
from asap.dataplane.gpu_layout import GPU_EXPERT_SPIN_S
from asap.dataplane.gpu_streams import critical, writer
from asap.dataplane.poller import PollThread
from asap.dataplane.ring import Backoff
from asap.errors import AsapError, InternalError, InvalidArgument, Unavailable
from asap.model.grouped import BUCKETS
from asap.telemetry import setup
from asap.v1 import common_pb2, expert_pb2
from expert_svc.core import ExpertExecutor
from expert_svc.fastlane import ExpertLinkEnd, FastLane, _Item, _record_spans
from expert_svc.gpu_graph import StepGraphs, step_graph_rows, step_graphs_enabled, step_key
from expert_svc.gpu_link_end import GpuExpertLinkEnd

__all__ = ["GpuExpertLinkEnd", "GpuFastLane"]

logger = logging.getLogger(__name__)


class GpuFastLane(FastLane):
    """All GPU fast links of one expert rank (``warm`` on the compute thread before SERVING)."""

    device_slots = True

    def __init__(
        self, executor: ExpertExecutor, *, max_merge_rows: int = 16384, flags: StreamFlags | None = None
    ) -> None:
        super().__init__(executor, shape_only=False, max_merge_rows=max_merge_rows)
        self.poller = PollThread(  # not started yet: it spins before parking (GPU hosts have cores)
            "gpu-fast-requests", flush=self._flush, backoff=lambda: Backoff(spin_s=GPU_EXPERT_SPIN_S)
        )
        self.device = executor.part.device
        self.flags = flags if flags is not None else driver_flags()
        self.stream = torch.cuda.current_stream(self.device)
        """The compute thread's stream (set by ``warm``, which runs there)."""
        self.poison_stream = writer(torch.device(self.device))
        """Poisons: the process's stream that never waits (``asap.dataplane.gpu_streams``, rule 3)."""
        self._bad_ids = torch.zeros((), dtype=torch.int64, device=self.device)
        self._pinned = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._reading: torch.cuda.Event | None = None
        self._read_at = 0.0
        self._checks_lock = threading.Lock()
        self.bad_ids = 0
        """Expert ids seen on the device that were neither -1 nor hosted here (those slots were skipped)."""
        self.steps: StepGraphs | None = None
        """The captured step (set by ``warm`` when on and supported; None: every step eager)."""
        self.graph_steps = 0
        """Dispatches answered by a captured step."""
        self.armed_hits = 0
        """Of those, computed by the step armed before the descriptor arrived (no launch on arrival)."""
        self.armed_misses = 0
        """Of those, whose armed step was for another bucket or window (launched behind it)."""
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
        critical(self.stream)  # no armed wait may share its hardware queue
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
            steps = StepGraphs(part, self._bad_ids, largest=step_graph_rows())
            steps.warm([b for b in BUCKETS if b <= steps.largest])
            self.steps = steps

    def step(self, item: _Item) -> bool:
        """On the poll thread: enqueue ``item``'s captured step and answer it; False if it has none (the
        compute thread then takes it)."""
        steps, end, request = self.steps, item.end, item.request
        if steps is None or not isinstance(end, GpuExpertLinkEnd) or not end.graphs:
            return False
        window, _ = steps.locate(request.layer)
        key = step_key(end.geometry, end.buckets, request.slot, request.rows, window)
        if key is None or key not in end.graphs:
            return False
        started, started_unix = time.monotonic_ns(), time.time_ns()
        error: AsapError | None = None
        try:
            if end._poisoned:
                raise Unavailable("the fast link was retired (its peer is gone)")
            with self._launch_lock, torch.cuda.stream(self.stream):
                self._collect()
                end.launch(request.slot, key, request.seq)
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
        end.rearm()
        if error is None and setup.TRACING_ENABLED:
            _record_spans(item, started_unix, compute_ns, time.time_ns())
        item.hidden = item.expert_ids = item.weights = torch.empty(0)
        end.release()
        return True

    def replay(self, graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> None:
        """Launch ``graph`` on ``stream``."""
        with torch.cuda.stream(stream):
            graph.replay()

    def mark(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """An event recorded on ``stream`` now."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        return event

    def order(self, later: torch.cuda.Stream, earlier: torch.cuda.Stream) -> None:
        """``later``'s next work waits for what ``earlier`` has enqueued so far."""
        later.wait_stream(earlier)

    def retire(self, graphs: object) -> None:
        """Keep a closed link's graphs until the stream has passed its queued launches."""
        with self._launch_lock:
            self._retired = [(e, g) for e, g in self._retired if not e.query()]  # type: ignore[no-untyped-call]
            if graphs:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self.stream)
                self._retired.append((event, graphs))

    def _watch(self, bad: torch.Tensor) -> None:
        """Count on the device the ids set in ``bad`` [N, K] (read later by ``_collect``)."""
        self._bad_ids.add_(bad.sum())

    def _collect(self) -> None:
        """Read the device count of expert ids not hosted here, at most every 0.1 s, through a
        pinned copy whose event is only queried (never waits)."""
        now = time.monotonic()
        with self._checks_lock:
            if self._reading is not None:
                if not self._reading.query():  # type: ignore[no-untyped-call]
                    return
                self._reading = None
                seen = int(self._pinned[0])
                if seen > self.bad_ids:
                    logger.warning(
                        "%d expert ids in GPU fast dispatches are not hosted here (their slots skipped)",
                        seen - self.bad_ids,
                    )
                    self.bad_ids = seen
            if now - self._read_at < 0.1:
                return
            self._read_at = now
            self._pinned.copy_(self._bad_ids.view(1), non_blocking=True)
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
            armed = end.armed_after(item.request.slot)
            if armed is not None:  # the slot's armed step (a no-op for this dispatch) must be over
                stream.wait_event(armed)
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
