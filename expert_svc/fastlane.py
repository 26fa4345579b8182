"""The expert rank's end of its fast links: one poll thread takes descriptors from every attached link
and feeds the compute thread directly; the compute thread writes results over the rows and publishes
completions itself. No event loop, no protobuf, no thread hop beyond poll thread -> compute thread.

Validation on the poll thread uses numpy views of the slot (a few µs), not torch ops (tens of µs each).

Emulated ranks (shape-only slots, ``inline``) compute on the poll thread itself: their computation is a
timed sleep of about a millisecond, so the hand-off to the compute thread (a thread wake, 70-200 µs per
layer on this 2-core host, more under load) cost more than it spared. Measured on the emulated cluster
(benchmarks/README.md, "CPU per-layer cost: expert hand-off and emulated-call fixes"). An earlier
measurement that rejected it (the emulated call 1.5-2x longer on the poll thread) predates the
emulated call's own fixes (``asap.emulation.clock.Sleeper.begin``, one validation pass); it did not
recur. While it computes the poll thread neither sweeps nor beats the heartbeat: emulated calls take
milliseconds (even dilated, far below the peer timeout of seconds). Real computations (seconds on a CPU)
keep the hand-off, so the heartbeat goes on.

Whoever computes takes *everything* waiting and merges the rows of one layer into one expert call (as
``ExpertExecutor``'s queued path does), so concurrent attention ranks still share a computation; it holds
the executor's compute lock, so the gRPC path's computations (sync mode, the barrier) never overlap it.
A dispatch whose ids this rank cannot compute is answered with an ``InvalidArgument`` completion for that
dispatch only, before it is queued (``validate``), so it never spoils a merge; the link and the rank go on.

One attached link (its region, rings and descriptor checks) is an ``ExpertLinkEnd``
(``expert_svc.fast_link_end``); one dispatch taken from it a ``LaneItem`` (``expert_svc.lane_item``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.poller import PollThread, doorbell_backoff
from asap.errors import AsapError, InternalError, InvalidArgument
from asap.telemetry import setup
from asap.v1 import common_pb2, expert_pb2
from expert_svc.core import ExpertExecutor
from expert_svc.fast_link_end import ExpertLinkEnd
from expert_svc.lane_end import LaneEnd, ServedEnds
from expert_svc.lane_item import LaneItem, record_spans

__all__ = ["ExpertLinkEnd", "FastLane", "LaneEnd", "LaneItem"]

logger = logging.getLogger(__name__)


class FastLane(ServedEnds[ExpertLinkEnd]):
    """All fast links of one expert rank: their poll thread and the hand-off to the compute thread."""

    def __init__(
        self,
        executor: ExpertExecutor,
        *,
        shape_only: bool,
        max_merge_rows: int = 16384,
        inline: bool | None = None,
    ) -> None:
        self.executor = executor
        self.inline = shape_only if inline is None else inline
        """Compute on the thread that took the descriptors (the poll thread) instead of handing them to
        the compute thread: the default for emulated (shape-only) ranks, whose computation is a timed
        sleep (see the module doc)."""
        part = executor.part
        self.hidden_size = part.config.hidden_size
        self.top_k = part.config.top_k
        self.dtype = part.dtype
        self.shape_only = shape_only
        self.max_merge_rows = max_merge_rows
        self._moe_layers = set(part.config.moe_layer_ids)
        self._num_experts = part.config.num_experts
        self._hosts = tuple(part.hosted)
        self._hosted = np.zeros(self._num_experts + 1, dtype=bool)  # index -1: a slot for another rank
        self._hosted[list(part.hosted)] = True
        self._hosted[-1] = True
        self._hosted_at_id_plus_1 = np.concatenate(([True], self._hosted[:-1]))  # index id + 1
        self._hosts_all = bool(self._hosted.all())
        self._meta_rows: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._waiting: list[LaneItem] = []
        self._busy = False
        spin = self.inline  # the poll thread is the hot path only when it computes (asap.dataplane.spin)
        self.poller = PollThread(
            "fast-requests", flush=self._flush, backoff=lambda: doorbell_backoff(spin=spin)
        )
        self.ends: set[ExpertLinkEnd] = set()

    def validate(self, layer: int, ids: np.ndarray) -> None:  # type: ignore[type-arg]
        """``ExpertExecutor.validate`` on a numpy view of the slot's ids (same rules, same messages).

        One pass for int32 ids (every slot's): ``id + 1`` read as unsigned puts -1 at 0 and every id
        out of range (below -1, or from ``num_experts`` on) above ``num_experts``, so one ``max`` checks
        the range and one lookup (skipped on a rank that hosts every expert) the hosting; the messages
        come from the full check, run only when that pass fails. Three numpy reductions cost ~25 µs a
        dispatch here, one add and one ``max`` ~8 µs."""
        if layer not in self._moe_layers:
            raise InvalidArgument(f"layer {layer} is not an MoE layer of this model")
        if ids.dtype == np.int32 and ids.size:
            shifted = (ids + 1).view(np.uint32)  # int32 wraps: INT32_MAX + 1 lands far above too
            if int(shifted.max()) <= self._num_experts and (
                self._hosts_all or bool(self._hosted_at_id_plus_1[shifted].all())
            ):
                return
        self._reject(ids)

    def _reject(self, ids: np.ndarray) -> None:  # type: ignore[type-arg]
        """The full check (and its messages) of ``validate``."""
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < -1 or high >= self._num_experts:
                raise InvalidArgument(f"expert ids must be in [-1, {self._num_experts}), got [{low}, {high}]")
            if not bool(self._hosted[ids].all()):
                bad = sorted({int(i) for i in ids.ravel().tolist() if i >= 0 and not self._hosted[i]})
                raise InvalidArgument(
                    f"experts {bad} are not hosted by this rank (hosts {list(self._hosts)})"
                )

    def meta_rows(self, rows: int) -> torch.Tensor:
        """A [rows, H] meta tensor of the model dtype (a shape-only dispatch's rows), made once per row
        count: a meta tensor has no storage, so items may share it."""
        hidden = self._meta_rows.get(rows)
        if hidden is None:
            hidden = torch.empty(rows, self.hidden_size, dtype=self.dtype, device="meta")
            if len(self._meta_rows) < 4096:
                self._meta_rows[rows] = hidden
        return hidden

    device_slots = False
    """Whether this rank serves links whose slots lie in GPU memory (``expert_svc.gpu_fastlane``)."""

    def check_geometry(self, g: LinkGeometry) -> None:
        if g.device_slots != self.device_slots:
            where = "GPU" if g.device_slots else "host"
            raise InvalidArgument(
                f"a fast link with slots in {where} memory announced to a rank that "
                f"serves {'GPU' if self.device_slots else 'host'} slots"
            )
        if (g.hidden_size, g.top_k, g.itemsize) != (self.hidden_size, self.top_k, self.dtype.itemsize):
            raise InvalidArgument(
                f"fast link of hidden {g.hidden_size}, top-k {g.top_k}, {g.itemsize}-byte elements for a "
                f"rank of hidden {self.hidden_size}, top-k {self.top_k}, {self.dtype}"
            )

    def attach(
        self, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion | None = None
    ) -> ExpertLinkEnd:
        """Map an announced region and start serving it; ``InvalidArgument`` if it is not a valid one
        (``cuda_region``: the slots' GPU memory of a GPU link, which a CPU rank refuses)."""
        return self._serve(self._end(link, cuda_region))

    def _end(self, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion | None) -> ExpertLinkEnd:
        if cuda_region is not None:
            raise InvalidArgument("a fast link with slots in GPU memory announced to a CPU rank")
        return ExpertLinkEnd(self, link)

    @property
    def waiting(self) -> int:
        """Dispatches taken off the rings, waiting for the compute thread (read without the lock: a
        list's length is one atomic read)."""
        return len(self._waiting)

    def enqueue(self, item: LaneItem) -> None:
        with self._lock:
            self._waiting.append(item)

    def hand_off(self) -> None:
        """Wake the compute thread for what was enqueued (the flush of a poll thread other than the
        lane's own, e.g. the NIXL lane's)."""
        self._flush()

    def _flush(self) -> None:
        """After a sweep (poll thread): compute what was taken here (``inline``), or wake the compute
        thread unless it is already draining."""
        with self._lock:
            if self._busy or not self._waiting:
                return
            self._busy = True
        try:
            if self.inline:
                self.executor.run_inline(self._drain)
            else:
                self.executor.run_on_compute_thread(self._drain)
        except AsapError as exc:
            with self._lock:
                items, self._waiting, self._busy = self._waiting, [], False
            for item in items:
                item.end.answer(item.request, None, error=exc)
                item.end.release()

    def _drain(self) -> None:
        """On the compute thread: compute everything waiting, merged by layer, until nothing is."""
        while True:
            with self._lock:
                items, self._waiting = self._waiting, []
                if not items:
                    self._busy = False
                    return
            for group in self._groups(items):
                self._compute(group)

    def _groups(self, items: list[LaneItem]) -> list[list[LaneItem]]:
        groups: dict[int, list[list[LaneItem]]] = {}
        order: list[list[LaneItem]] = []
        for item in items:
            bucket = groups.setdefault(item.layer, [])
            rows = item.request.rows
            if bucket and sum(i.request.rows for i in bucket[-1]) + rows <= self.max_merge_rows:
                bucket[-1].append(item)
                continue
            bucket.append([item])
            order.append(bucket[-1])
        return order

    def _run_group(self, group: list[LaneItem]) -> tuple[list[torch.Tensor], int]:
        """The computation of one group: its outputs per item and the host time it took (a lone item
        into the memory its end sends results from, where the end has such: ``LaneEnd.result_rows``)."""
        out = group[0].end.result_rows(group[0].request) if len(group) == 1 else None
        return self.executor.compute_rows(group, out)

    def _inputs_ready(self, group: list[LaneItem]) -> Callable[[float | None], None] | None:
        """An emulated part computing inline: tell it when this group's rows were taken (the latest
        pick, or modelled arrival where later), so its modelled time counts from there (``EmulatedExpertPart.inputs_ready``); what the
        poll thread did since (descriptor, header, id checks, the merge) runs inside that time, as a
        device's armed step starts when the rows land. Returns the call that forgets it afterwards."""
        ready: Callable[[float | None], None] | None = getattr(self.executor.part, "inputs_ready", None)
        if ready is None or not self.inline:
            return None
        picked_ns = max(max(item.picked_ns, item.request.not_before_ns) for item in group)  # and arrived
        ready(time.perf_counter() - max(0, time.monotonic_ns() - picked_ns) / 1e9)
        return ready

    def _compute(self, group: list[LaneItem]) -> None:
        started = time.monotonic_ns()
        started_unix = time.time_ns()
        ready = self._inputs_ready(group)
        try:
            outs, compute_ns = self._run_group(group)
        except Exception as exc:  # a failed computation fails its dispatches, never the rank
            logger.exception("expert computation failed for layer %d", group[0].layer)
            error = (
                exc if isinstance(exc, InvalidArgument) else InternalError(f"expert compute failed: {exc}")
            )
            for item in group:
                item.end.answer(item.request, None, error=error)
                item.end.release()
            return
        finally:
            if ready is not None:
                ready(None)  # used by the call, or the call never came: no start left for the next
        sent = []
        for item, out in zip(group, outs, strict=True):
            item.end.answer(
                item.request,
                out,
                queue_ns=started - item.picked_ns,
                compute_ns=compute_ns,
                picked_unix_ns=item.picked_unix_ns,
            )
            sent.append(time.time_ns())
        if setup.TRACING_ENABLED:  # spans after the completions are out, from the times taken above
            for item, sent_ns in zip(group, sent, strict=True):
                record_spans(item, started_unix, compute_ns, sent_ns)
        for item in group:
            item.hidden = item.expert_ids = item.weights = torch.empty(0)  # drop the views of the slot
            item.end.release()


_Item = LaneItem
_record_spans = record_spans
"""Former names (``expert_svc.gpu_fastlane`` and ``gpu_link_end`` import them from here)."""
