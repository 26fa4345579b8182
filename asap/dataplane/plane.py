"""``DataPlane``: how one attention -> expert link carries a dispatch and brings back its combined result.

An attention rank keeps one link per expert rank (``attention_svc.expert_link.ExpertLink``). The link
owns what every plane shares (the gRPC ``Expert.Exchange`` stream, the in-flight check, the dispatch
span); the plane owns how the rows travel (and, with emulated compute, what their travel costs). The plane is chosen **once**, at
link set-up, after the expert rank's ``Info`` answer (``asap.dataplane.select``: the attention rank's
candidate, then ``confirm_data_plane`` with what the expert rank accepts), and built by
``asap.dataplane.planes.make_plane``. After that nothing branches on the plane's name.

Planes today, all carried by the gRPC stream (``asap.dataplane.planes``):

- ``grpc``: hidden rows and results inline in the stream's messages, as bytes;
- ``shm`` (same-host CPU ranks): rows written into a POSIX shared-memory region of the link, the chunk
  carries a reference; the expert rank writes its results back over the same rows;
- ``cuda-ipc`` (same-host GPU ranks): the same with GPU memory shared by CUDA IPC; the region is announced
  on the first chunk of each stream.

And ``fast`` (``asap.dataplane.fast``, ``asap.dataplane.gpu_fast``), which uses the stream only for the
announcement, errors and what its slots cannot carry: descriptor rings in shared memory, slots in shared
memory (CPU ranks) or CUDA IPC memory with ready flags on the streams (GPU ranks).

A plane need not use the gRPC stream for the per-layer exchange: ``exchange`` is the whole round trip, so a
plane may publish a descriptor in shared memory and await completion from a poll thread (docs/architecture.md §6),
keeping the stream for set-up, errors and the dispatches it cannot carry. The stream hooks
(``stream_opened``, ``answer_dropped``, ``stream_ended``) then concern only what it still sends there.

This module imports neither grpc nor the protos: it is the contract, implementations live beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from asap.model.placement import RankDispatch
from asap.syncstep import SyncStep

__all__ = ["DataPlane", "ExchangeKey", "ExchangeResult", "LinkSpec", "PlaneRequest", "PlaneStats"]

ExchangeKey = tuple[int, int]
"""(micro_batch, layer): what identifies one dispatch on a link, and its answers."""


@dataclass(slots=True)
class ExchangeResult:
    """One expert rank's answer to a dispatch."""

    hidden: torch.Tensor
    """[n, H] the combined partial result of the dispatch's rows."""
    barrier_ns: int = 0
    """Sync mode: how long the expert rank held the dispatch at its barrier (the longest of its chunks)."""
    ready: torch.cuda.Event | None = None
    """GPU ``fast`` plane: ``hidden`` is complete once this event has passed (also attached to the tensor,
    ``asap.devices.attach_ready``); readers on another stream wait for it there. None: complete."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """What a plane is built from: the two ends of the link and the shape of what travels on it."""

    attention_rank: int
    expert_rank: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    """Where the attention rank's hidden rows live (and where ``cuda-ipc`` results are assembled)."""
    max_chunk_bytes: int
    """Bound on one stream message (planes whose chunks carry only references may use a larger one)."""
    region_bytes: int | None = None
    """Same-host planes: size of the link's region; None = the plane's default."""
    link_s: Callable[[int], float] | None = None
    """Emulated compute (always the ``grpc`` plane): activations travel as shapes only, and each dispatch
    is charged this link time (seconds for a payload of that many bytes) before it is sent."""

    @property
    def shape_only(self) -> bool:
        """Whether activations travel as shapes only (emulated compute)."""
        return self.link_s is not None


@dataclass(slots=True)
class PlaneStats:
    """Counters of one link's plane (read by tests, benchmarks and the bench report)."""

    region_hidden_bytes: int = 0
    """Hidden-row payload bytes sent through a region of the link (shared memory or CUDA IPC)."""
    inline_hidden_bytes: int = 0
    """Hidden-row payload bytes sent inline on the stream."""
    result_ref_bytes: int = 0
    """Result bytes the expert rank wrote back into this link's regions (not inline)."""
    quarantined: int = 0
    """Dispatches abandoned with answers outstanding, whose memory waited for the late answers."""


@dataclass(slots=True)
class PlaneRequest:
    """One dispatch handed by the link to its plane."""

    micro_batch: int
    layer: int
    dispatch: RankDispatch
    sync: SyncStep | None = None
    """The global step in the sync modes (the expert rank's barrier waits for it); None = async."""
    traceparent: str = ""
    """Tracing on: the ``attention.dispatch`` span's context, to be carried with the rows."""
    tracestate: str = ""
    sent: Callable[[], None] = field(default=lambda: None)
    """Called once everything of the dispatch is on its way (ends the dispatch span); not on failure."""

    @property
    def key(self) -> ExchangeKey:
        return (self.micro_batch, self.layer)

    @property
    def rows(self) -> int:
        return int(self.dispatch.hidden.shape[0])


class DataPlane(Protocol):
    """How one link carries dispatches and results. The contract every plane keeps:

    ``exchange(request)``
        Send ``request.dispatch`` to the expert rank and return its combined result.

        - *Input*: ``dispatch.hidden`` [n, H] (n may be 0 in the sync modes), ``expert_ids`` / ``weights``
          [n, K]. On CUDA the rows are produced on the attention rank's compute stream: read them only
          after ``dispatch.ready`` (wait on it on the plane's own stream, never block the compute thread).
        - *Output*: ``ExchangeResult.hidden`` [n, H] in the link's dtype, on ``LinkSpec.device`` for
          ``cuda-ipc`` and GPU ``fast`` (CPU otherwise, ``meta`` when ``shape_only``), complete and safe to
          read on any stream once returned (copies out of shared memory are finished), except that the
          GPU ``fast`` plane returns before its copy ran: it sets ``ready`` (readers' streams wait for
          it; ``combine`` does); ``barrier_ns`` as the expert rank reported it.
        - *Concurrency*: called concurrently for different keys on the event loop; never for a key
          already in flight (the link refuses that before calling).
        - *Errors*: ``Unavailable`` when the path to the expert rank broke (every exchange waiting on it
          fails at once, and a later exchange may use a fresh path); the expert rank's in-band error for
          this dispatch (its ``AsapError`` class) fails this exchange only; ``InvalidArgument`` for an
          answer that does not fit.
        - *Cancellation* (the batch was cancelled or another exchange of the layer failed): return promptly;
          memory the expert rank may still write into stays reserved until its answer comes or the path
          ends, so it is never handed to another dispatch too early (counted in ``stats.quarantined``).
        - ``request.sent()`` is called once when the dispatch is on its way.

    ``stream_opened()`` / ``answer_dropped(key)`` / ``stream_ended()``
        The link's gRPC stream started / delivered an answer for a key nobody waits for (an abandoned
        dispatch) / ended. A plane that keeps memory per stream renews, frees or releases it here.

    ``close()``
        Release everything the plane holds (regions, threads); safe to call twice.
    """

    name: str
    """The plane's name as ``--data-plane`` spells it: ``grpc``, ``shm``, ``cuda-ipc``."""

    @property
    def stats(self) -> PlaneStats:
        """The plane's counters so far."""
        ...

    async def exchange(self, request: PlaneRequest) -> ExchangeResult: ...

    def stream_opened(self) -> None: ...

    def answer_dropped(self, key: ExchangeKey) -> None: ...

    def stream_ended(self) -> None: ...

    def close(self) -> None: ...
