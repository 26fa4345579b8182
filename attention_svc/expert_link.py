"""The link from an attention rank to one expert rank: its ``Expert.Exchange`` stream and its data plane.

One long-lived stream (``asap.rpc.duplex.DuplexStream``): answers are routed to the dispatch they belong
to by (micro_batch, layer); when the stream breaks, every dispatch waiting on it fails with
``Unavailable`` at once, and the next exchange opens a fresh stream.

How the rows travel is the link's data plane (``asap.dataplane.plane.DataPlane``), chosen once, after the
expert rank's ``Info`` answer: gRPC bytes, shared memory (same-host CPU ranks) or CUDA IPC (same-host GPU
ranks), see ``asap.dataplane.planes``; the fast rings (same-host CPU ranks) or NIXL WRITEs (a remote
expert rank, ``asap.dataplane.nixl_select``) over one of them. The link keeps what every plane shares: the stream, the check that
a dispatch is not already in flight, and the ``attention.dispatch`` span.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast, runtime_checkable

import grpc
import torch

from asap.dataplane.cuda_ipc import gpu_uuid
from asap.dataplane.direct import Armed, DirectLink, Ticket
from asap.dataplane.fast import FastOptions
from asap.dataplane.nixl_select import confirm_nixl, nixl_candidate
from asap.dataplane.plane import DataPlane, ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.planes import ExchangeStream, StreamPlane, make_plane
from asap.dataplane.select import confirm_data_plane, confirm_fast, fast_possible, select_data_plane
from asap.errors import InternalError, Unavailable
from asap.metrics import EXCHANGE_BUCKETS_S, Distribution
from asap.model.placement import RankDispatch
from asap.rpc.channels import aio_channel
from asap.rpc.duplex import DuplexStream
from asap.rpc.status import error_from_rpc
from asap.rpc.tls import TlsConfig
from asap.syncstep import SyncStep
from asap.telemetry import setup, spans
from asap.v1 import expert_pb2, expert_pb2_grpc

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span


class ExpertLink:
    """The stream to one expert rank and the data plane of that link."""

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
        fast: FastOptions | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.target = target
        self.rank = rank
        self.requested_plane = data_plane
        self.device = torch.device(device)
        self.data_plane = select_data_plane(data_plane, target, device, emulated=link_s is not None)
        """``grpc``, ``shm``, ``cuda-ipc`` or ``fast``; ``auto`` may still fall back after ``info``."""
        self._fast = fast_possible(data_plane, target, device)
        self._nixl, self.plane_reason = nixl_candidate(data_plane, target, emulated=link_s is not None)
        """Whether NIXL is tried, and why not (``plane_reason``, logged once the plane is settled)."""
        self.spec = LinkSpec(
            attention_rank=attention_rank,
            expert_rank=rank,
            hidden_size=hidden_size,
            dtype=dtype,
            device=self.device,
            max_chunk_bytes=max_chunk_bytes,
            region_bytes=region_bytes,
            link_s=link_s,
        )
        self._codec = codec
        self._fast_options = fast
        self._channel = aio_channel(target, tls)
        self._stub = expert_pb2_grpc.ExpertStub(self._channel)
        self.stream: ExchangeStream = DuplexStream(
            self._stub.Exchange,
            key_of=lambda msg: (msg.micro_batch, msg.layer),
            peer=f"expert rank {rank} at {target}",
            name=f"combine-rx-{rank}",
            on_open=lambda: self.plane.stream_opened(),
            on_unmatched=lambda key, _msg: self.plane.answer_dropped(key),
            on_broken=lambda _error, _failed: self.plane.stream_ended(),
        )
        self.plane: DataPlane = StreamPlane(self.spec, self.stream, codec)
        """Inline bytes until ``info`` settles the link's plane (once)."""
        self._settled = False
        self._inflight: set[ExchangeKey] = set()
        self.round_trip_s = Distribution(EXCHANGE_BUCKETS_S)
        """Successful exchanges on this link, dispatch handed to the plane -> combined result back."""
        self.failures = 0
        """Exchanges that failed (the expert rank's error, a broken stream) or were cancelled."""

    async def info(self, timeout_s: float) -> expert_pb2.ExpertInfo:
        """The expert rank's ``Info``; the first answer settles the link's data plane."""
        try:
            info: expert_pb2.ExpertInfo = await self._stub.Info(
                expert_pb2.ExpertInfoRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise Unavailable(
                f"expert rank {self.rank} at {self.target}: {error_from_rpc(exc).message}"
            ) from exc
        if not self._settled:
            uuid = gpu_uuid(self.device) if self.data_plane == "cuda-ipc" else ""
            where = f"{self.rank} at {self.target}"
            plane = confirm_data_plane(
                self.requested_plane, self.data_plane, info, gpu_uuid=uuid, where=where
            )
            fallback = "grpc"
            gpu_inner = plane if self.device.type == "cuda" else None
            if self._fast and confirm_fast(self.requested_plane, info, where=where, gpu_inner=gpu_inner):
                plane, fallback = "fast", plane  # the rings, over the plane they fall back to
            elif self._nixl:
                use, self.plane_reason = confirm_nixl(self.requested_plane, info, where=where)
                if use:
                    plane, fallback = "nixl", plane  # WRITEs, over gRPC bytes for what slots cannot carry
            if plane == "grpc" and self.plane_reason and self.requested_plane == "auto":
                logger.info("link to expert rank %s: gRPC bytes, not NIXL: %s", where, self.plane_reason)
            self.plane = make_plane(
                plane, self.spec, self.stream, self._codec, fallback=fallback, fast=self._fast_options
            )
            self.data_plane = plane
            self._settled = True
            logger.info("link to expert rank %s: data plane %s (fallback %s)", where, plane, fallback)
        return info

    def reset_exchange_stats(self) -> None:
        """Forget the round trips and failures so far (the rank's warm-up), so the metrics show serving."""
        self.round_trip_s = Distribution(EXCHANGE_BUCKETS_S)
        self.failures = 0

    @property
    def region_hidden_bytes(self) -> int:
        """Hidden-row payload bytes sent through a region of the link (shared memory or CUDA IPC)."""
        return self.plane.stats.region_hidden_bytes

    @property
    def inline_hidden_bytes(self) -> int:
        """Hidden-row payload bytes sent inline on the stream."""
        return self.plane.stats.inline_hidden_bytes

    @property
    def result_ref_bytes(self) -> int:
        """Result bytes the expert rank wrote back into this link's regions (not inline)."""
        return self.plane.stats.result_ref_bytes

    @property
    def quarantined(self) -> int:
        """Dispatches abandoned with chunks unanswered, whose slots waited for the late answers."""
        return self.plane.stats.quarantined

    async def exchange(
        self,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        sync: SyncStep | None = None,
        trace: Context | None = None,
    ) -> ExchangeResult:
        """Send one dispatch over the link's plane; its combined result [n, H] (see ``DataPlane``)."""
        key = (micro_batch, layer)
        if key in self._inflight:
            raise InternalError(f"dispatch {key} to expert rank {self.rank} is already in flight")
        request = PlaneRequest(micro_batch, layer, dispatch, sync)
        span: Span | None = None
        if trace is not None:
            # Encoding and sending are the dispatch span; its context rides with the rows, so the expert
            # rank's spans of these rows join this trace although the stream is shared.
            span = setup.get_tracer().start_span(
                spans.ATTENTION_DISPATCH,
                context=trace,
                attributes={
                    spans.LAYER: layer,
                    spans.EXPERT_RANK: self.rank,
                    spans.TOKENS: request.rows,
                    spans.MICRO_BATCH: micro_batch,
                },
            )
            request.traceparent, request.tracestate = spans.inject(spans.context_of(span))

            def sent() -> None:
                nonlocal span
                if span is not None:
                    span.end()
                    span = None

            request.sent = sent
        self._inflight.add(key)
        started = time.monotonic_ns()
        try:
            result = await self.plane.exchange(request)
            self.round_trip_s.observe((time.monotonic_ns() - started) * 1e-9)
            return result
        except BaseException:
            self.failures += 1
            raise
        finally:
            self._inflight.discard(key)
            if span is not None:  # failed or cancelled before everything was sent
                span.end()

    def direct(self, top_k: int) -> DirectLink | None:
        """The plane's hot path for one batch (``asap.dataplane.direct``), or None where the plane has
        none. On the event loop, at the batch's start; ``Unavailable`` if the link cannot be set up."""
        direct = getattr(self.plane, "direct", None)
        if direct is None:
            return None
        link: DirectLink | None = direct(top_k)
        return None if link is None else _metered(link, self)

    async def close(self) -> None:
        try:
            await self.stream.close()
            await self._channel.close()
        finally:  # the plane's regions and names go whatever the stream's end did
            self.plane.close()


@runtime_checkable
class _PollingLink(DirectLink, Protocol):
    """A hot-path link whose results the waiting thread can take itself (``DirectLink.poll``)."""

    def poll(self) -> None: ...


@runtime_checkable
class _ParkingLink(_PollingLink, Protocol):
    """A polling link whose waiting thread can also sleep on the peer's doorbell (``DirectLink.park``)."""

    def park(self, on: bool) -> Sequence[int]: ...


@runtime_checkable
class _FutexParkingLink(_ParkingLink, Protocol):
    """A parking link whose waiting thread can sleep on futex words too (``DirectLink.park_futex``)."""

    def park_futex(self, on: bool) -> tuple[int, int] | None: ...


L = TypeVar("L", bound=DirectLink)
P = TypeVar("P", bound=_PollingLink)


def _metered(link: DirectLink, owner: ExpertLink) -> DirectLink:
    """``link`` with its round trips and failures recorded on ``owner``, offering the same optional calls
    as ``link`` and no others: the direct runner polls and parks only links that have ``poll`` / ``park``."""
    if isinstance(link, _FutexParkingLink):
        return _MeteredFutexParkingLink(link, owner)
    if isinstance(link, _ParkingLink):
        return _MeteredParkingLink(link, owner)
    if isinstance(link, _PollingLink):
        return _MeteredPollingLink(link, owner)
    return _MeteredLink(link, owner)


class _MeteredLink(Generic[L]):
    """A plane's hot-path link that records each settled dispatch's round trip and failures on the
    ``ExpertLink`` (what ``exchange`` records on the loop path), so the metrics see both paths."""

    __slots__ = ("_inner", "_owner")

    def __init__(self, inner: L, owner: ExpertLink) -> None:
        self._inner = inner
        self._owner = owner

    def _observe(self, ticket: Ticket) -> None:
        # (an early result is observed at its verdict, which may be a failure: ``Ticket.settle``)
        if ticket.failure is None and isinstance(ticket.outcome, ExchangeResult):
            self._owner.round_trip_s.observe((time.monotonic_ns() - ticket.posted_ns) * 1e-9)
        else:
            self._owner.failures += 1

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        ticket.observe = self._observe
        self._inner.post(request, ticket)

    def arm(self, request: PlaneRequest, ticket: Ticket) -> Armed | None:
        """The plane's ``arm`` (``DirectLink.arm``), metered as ``post``; None when it has none."""
        arm = getattr(self._inner, "arm", None)
        if arm is None:
            return None
        ticket.observe = self._observe
        return cast("Armed | None", arm(request, ticket))

    def abandon(self, ticket: Ticket) -> None:
        self._inner.abandon(ticket)

    @property
    def spin_wait(self) -> bool:
        """The plane's ``spin_wait`` (whether its waiter may spin before parking: asap.dataplane.spin)."""
        return bool(getattr(self._inner, "spin_wait", False))


class _MeteredPollingLink(_MeteredLink[P]):
    """A metered link of a plane whose results the waiting thread takes itself."""

    __slots__ = ()

    def poll(self) -> None:
        self._inner.poll()


class _MeteredParkingLink(_MeteredPollingLink[_ParkingLink]):
    """A metered link of a plane whose waiting thread polls and sleeps on the peer's doorbell."""

    __slots__ = ()

    def park(self, on: bool) -> Sequence[int]:
        return self._inner.park(on)


class _MeteredFutexParkingLink(_MeteredParkingLink):
    """A metered link of a plane whose waiting thread may also sleep on the peer's futex word."""

    __slots__ = ()

    def park_futex(self, on: bool) -> tuple[int, int] | None:
        return cast(_FutexParkingLink, self._inner).park_futex(on)
