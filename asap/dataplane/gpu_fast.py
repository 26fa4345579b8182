"""``fast`` on GPU ranks: the per-layer exchange of same-host GPU ranks through the descriptor rings, with
the slots' payload in CUDA IPC memory and ready flags written and waited on by CUDA streams (DESIGN §9).

Per dispatch, nothing waits for a GPU on either host:

1. the event loop enqueues on the link's *tx* stream: wait for the rows (``dispatch.ready``) and for the
   slot's previous results to be copied out, copy rows, ids and weights into the slot, write the slot's
   request flag = seq; then it publishes the descriptor (rows, layer, seq: the counts the expert's host
   needs) in the request ring and returns to the loop;
2. the expert rank's poll thread takes the descriptor and enqueues a wait for the request flag, the
   expert step captured for the slot and the rows' bucket (one graph launch: the results over the rows)
   and the slot's done flag = seq, and publishes the completion (status only) at once; other shapes go to
   its compute thread, which enqueues the same eagerly (``expert_svc.gpu_fastlane``, ``gpu_graph``);
3. this side's poll thread takes the completion; on the loop the *rx* stream waits for the done flag and
   copies the results out of the slot; the result tensor carries that copy's event
   (``asap.devices.attach_ready``), which ``combine`` waits for on the compute stream.

A slot's payload is laid out for the rows' token bucket (``gpu_layout_rows``), so the captured step's
views of a slot are fixed per bucket. With ``ASAP_GPU_HOT_PATH=1`` the attention compute thread does
step 1 itself and takes its completions (``direct``, ``asap.dataplane.direct``) instead of the loop.
``ASAP_GPU_LEAN_FILL=1`` makes step 1 cheaper on the host (``gpu_attention_end``: cached views, one
batched write of the step words and the flag; on the hot path the compute stream fills). With
``ASAP_GPU_HOST_FREE=1`` too, a hot-path dispatch whose results were prefetched settles its ticket
right after publication (early results, ``asap.dataplane.direct``): the combine waits on the device
for the copy out that the done flag releases, and the completion, taken later, is the verdict the
compute thread checks before the next layer's dispatches (``attention_svc.direct_runner``).
Both are experimental and off by default: no cluster-level A/B has shown them faster yet. Their GPU test
(``tests/gpu/test_gpu_fast.py``, ``test_hot_path_early_results_and_fills_match_grpc``) hung once on an
H200 on 2026-12-02 (its third cluster, the first with early results, never became ready); on a later
machine it passed (both parameters) and the same cluster sequence ran three times without a hang, so the
cause of that one hang is not known.

Every wait is for a flag whose write the peer had already enqueued, so no two streams wait on each other.
A peer that dies with work enqueued never writes its flags: the host that learns of it (stream break,
heartbeat older than the bound) poisons every flag of the region (``asap.dataplane.gpu_flags``), so all
streams drain, fails the waiting dispatches with ``Unavailable`` and retires the region.

Known gap: a peer that dies after publishing a completion but before its GPU work ran leaves results
the stream copies out unwritten (the poison releases the copy); only dispatches still waiting fail.
"""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import Executor
from typing import Any

import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fast import DEFAULT_PEER_TIMEOUT_S, DEFAULT_SLOTS, FastPlane, _Direct
from asap.dataplane.fast_attention import ATTACH_S, AttentionLinkEnd
from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.gpu_attention_end import GpuAttentionLinkEnd, Timing
from asap.dataplane.gpu_flags import StreamFlags, driver_flags
from asap.dataplane.gpu_layout import (
    DEFAULT_GPU_SLOT_BYTES,
    GPU_POLL_SPIN_S,
    env_switch,
    gpu_layout_rows,
    gpu_slot_bytes_for,
    host_free_enabled,
    loop_bell_enabled,
)
from asap.dataplane.plane import DataPlane, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.poller import OnePerProcess, PollThread
from asap.dataplane.ring import Backoff
from asap.devices import attach_ready, attached_ready
from asap.errors import InternalError, Unavailable

__all__ = [
    "DEFAULT_GPU_SLOT_BYTES",
    "GPU_HOT_PATH_ENV",
    "GPU_POLL_SPIN_S",
    "GpuAttentionLinkEnd",
    "GpuFastPlane",
    "Timing",
    "gpu_hot_path_enabled",
    "gpu_layout_rows",
    "gpu_poller",
    "gpu_slot_bytes_for",
]

GPU_HOT_PATH_ENV = "ASAP_GPU_HOT_PATH"
"""``1``: GPU fast links offer the attention rank's hot path (``asap.dataplane.direct``: the compute
thread enqueues the fill and publishes, and takes its completions itself); default off, so async
batches on GPU links take ``exchange`` through the event loop."""


def gpu_hot_path_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(GPU_HOT_PATH_ENV, False, environ)


_POLLER = OnePerProcess(
    lambda: PollThread("gpu-fast-completions", backoff=lambda: Backoff(spin_s=GPU_POLL_SPIN_S))
)


def gpu_poller() -> PollThread:
    """The attention process's poll thread for the completions of its GPU fast links (it spins)."""
    return _POLLER.get()


class GpuFastPlane(FastPlane):
    """The ``fast`` plane of a GPU link (see the module doc); ``inner`` (``cuda-ipc``) carries the
    sync-mode dispatches and those larger than a slot."""

    device_slots = True

    def __init__(
        self,
        spec: LinkSpec,
        stream: Any,
        codec: Executor,
        inner: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
        attach_s: float = ATTACH_S,
        flags: StreamFlags | None = None,
    ) -> None:
        super().__init__(
            spec, stream, codec, inner, slots=slots, peer_timeout_s=peer_timeout_s, attach_s=attach_s
        )
        self.flags = flags if flags is not None else driver_flags()
        self.early_results = 0
        """Hot-path dispatches settled early with their prefetched results (``ASAP_GPU_HOST_FREE``)."""

    def _slot_bytes(self) -> int:
        return gpu_slot_bytes_for(self.spec, self.slots)

    def _end_for(self, session: object, geometry: LinkGeometry) -> AttentionLinkEnd:
        end = self._end
        if end is not None and end.broken is None and self._session is session and end.geometry is geometry:
            return end
        if end is not None:
            end.fail(Unavailable(f"{self.stream.peer}: fast link replaced"))
        spec = self.spec
        end = GpuAttentionLinkEnd(
            geometry,
            device=spec.device,
            flags=self.flags,
            attention_rank=spec.attention_rank,
            expert_rank=spec.expert_rank,
            dtype=spec.dtype,
            peer=self.stream.peer,
            peer_timeout_s=self.peer_timeout_s,
            attach_s=self.attach_s,
            loop=asyncio.get_running_loop(),
            poller=gpu_poller(),
        )
        # The loop takes its own completions where no compute thread sleeps on the end (hot path off)
        end.loop_bell = loop_bell_enabled() and not gpu_hot_path_enabled()
        session.send(end.announcement())  # type: ignore[attr-defined]
        self._end, self._session = end, session
        return end

    def direct(self, top_k: int) -> _GpuDirect | None:  # type: ignore[override]
        """The hot path for one batch where ``ASAP_GPU_HOT_PATH`` is on (on the event loop, at its
        start), else None: the batch takes ``exchange`` through the event loop."""
        if not gpu_hot_path_enabled():
            return None
        end = self._end_for(self.stream.open(), self._geometry(top_k))
        assert isinstance(end, GpuAttentionLinkEnd)
        link = _GpuDirect(self, end, asyncio.get_running_loop())
        link.host_free = host_free_enabled()
        return link

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        geometry = self._geometry(int(request.dispatch.expert_ids.shape[1]))
        if request.sync is not None or request.rows == 0 or request.rows > self.max_rows:
            return await self.inner.exchange(request)
        end = self._end_for(self.stream.open(), geometry)
        assert isinstance(end, GpuAttentionLinkEnd)
        slot = await end.take_slot()
        seq, filled = 0, False
        try:
            header = end.header(
                request.micro_batch,
                request.layer,
                request.rows,
                request.traceparent,
                request.tracestate,
                slot,
            )
            end.enqueue_fill(slot, header, request.dispatch)
            filled = True
            seq, future = end.publish(
                slot, request.micro_batch, request.layer, request.rows, shape_only=False, link_s=0.0
            )
            end.prefetch(slot, seq, request.rows)
            self._hidden_bytes += request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
            self.fast_exchanges += 1
            request.sent()
            assert future is not None  # no ticket given: the result comes on the event loop
            hidden = await future
            return ExchangeResult(hidden, ready=attached_ready(hidden))
        finally:
            if seq == 0:
                end.give_back(slot)
                if filled:
                    _unpublished(end)
            else:
                end.abandon(seq)


def _settle_early(end: GpuAttentionLinkEnd, seq: int, ticket: Ticket) -> bool:
    """Settle ``ticket`` with the results prefetched for ``seq`` (``Ticket.settle_early``): the compute
    stream then waits for their copy's event, which the expert's done flag or a poison releases, and
    the completion taken later is the verdict. Under the end's pending lock, so the completion's settle
    comes strictly after (or, taken first, makes this a no-op). Nothing prefetched (no wait stream, not
    attached yet): the ticket waits for the completion as usual."""
    with end.pending_lock:
        if not end.is_pending(seq):
            return False
        copied = end.early_result(seq)
        if copied is None:
            return False
        result, event = copied
        ticket.settle_early(ExchangeResult(attach_ready(result, event), ready=event))
        return ticket.provisional


def _unpublished(end: GpuAttentionLinkEnd) -> None:
    """A slot was filled (its request flag will pass) but its descriptor never published: the expert's
    step armed on that slot would compute it and miss the next one, so the region is retired."""
    end.fail(Unavailable(f"{end.peer}: a filled fast link slot was not published; region retired"))


class _GpuDirect(_Direct):
    """``DirectLink`` of a GPU fast link for one batch: the compute thread enqueues the slot's fill and
    request flag on the tx stream and publishes; completions are taken by whichever thread polls (the
    result carries its copy's event, which ``combine`` waits for on the compute stream)."""

    end: GpuAttentionLinkEnd
    plane: GpuFastPlane
    armable = False
    """Not the CPU link's two-step fill: a GPU slot is filled on the tx stream by ``_send`` (and the real
    attention part leaves no layer work to overlap: ``MoERequest.rest`` is None)."""
    host_free = False
    """``ASAP_GPU_HOST_FREE``: tickets settled early with their prefetched results (``_settle_early``)."""

    def _to_inner(self, request: PlaneRequest) -> bool:
        return request.rows == 0 or super()._to_inner(request)

    def _send(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        plane, end = self.plane, self.end
        try:
            stream = torch.cuda.current_stream(end.device)  # the compute thread's: it made the dispatch
            end.enqueue_fill(slot, plane._header(end, slot, request), request.dispatch, stream)
            try:
                seq, _ = plane._publish(end, slot, request, ticket)
            except BaseException:
                _unpublished(end)
                raise
            end.prefetch(slot, seq, request.rows)
            if self.host_free and _settle_early(end, seq, ticket):
                plane.early_results += 1
        except (ValueError, IndexError, TypeError, struct.error) as exc:  # the region retired under the fill
            if end.broken is not None:
                raise end.broken from None
            raise InternalError(f"{end.peer}: filling a GPU fast link slot failed: {exc}") from exc
        return seq
