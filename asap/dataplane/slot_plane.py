"""What the planes of K fixed slots per link share (``fast``, its GPU variant and ``nixl``): the link's
stream and codec thread, the ``inner`` plane for what the slots cannot carry (sync-mode dispatches and
those larger than a slot), the slot geometry that the first dispatch's top-k sets, the plane's counters
and the stream events every such plane handles alike. How a slot is filled and published is theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.plane import DataPlane, LinkSpec, PlaneStats
from asap.errors import AsapError, InvalidArgument, Unavailable
from asap.faultbound import fault_bound_s, peer_timeout_s

__all__ = [
    "CODEC_FILL_BYTES",
    "DEFAULT_PEER_TIMEOUT_S",
    "DEFAULT_SLOTS",
    "SlotPlane",
    "await_credit",
    "slot_bytes_for",
]

DEFAULT_SLOTS = 4
"""Slots per link: at least the micro-batches an attention rank keeps in flight (2 with dual-batch)."""
DEFAULT_PEER_TIMEOUT_S = peer_timeout_s(fault_bound_s())
"""A peer whose heartbeat is older than this while dispatches wait is taken for dead or frozen: 2.5 s of
the default 5 s failure bound of the reliability contract (``asap.faultbound``), before gRPC keepalive
breaks the stream (3 s at the earliest). (2 s failed healthy ranks still starting on a loaded 2-core
host; start-up has its own bound, ``ATTACH_S``.) Default of ``--fast-peer-timeout``."""
CODEC_FILL_BYTES = 1 << 20
"""Rows above this are copied into the slot on the codec thread, not on the event loop."""
_SHAPE_ONLY_SLOT_BYTES = 4 * 1024 * 1024  # ids and weights of ~64k rows at top-8
_SLOT_BYTES = 48 * 1024 * 1024  # rows of an 8k-token dispatch at hidden 2048 in float32 with room to spare


def slot_bytes_for(spec: LinkSpec, slots: int) -> int:
    """Bytes per slot: ``region_bytes / slots`` when given, else a size for the worst common case
    (shared memory is touched lazily, so unused room costs no memory)."""
    if spec.region_bytes:
        size = spec.region_bytes // slots
    else:
        size = _SHAPE_ONLY_SLOT_BYTES if spec.shape_only else _SLOT_BYTES
    return max(8192, size // 4096 * 4096)


async def await_credit(waiter: asyncio.Future[int], give_back: Callable[[int], None]) -> int:
    """The slot ``waiter`` is handed; one handed over just as the wait was cancelled goes back."""
    try:
        return await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            give_back(waiter.result())
        raise


class _End(Protocol):
    def fail(self, error: AsapError) -> None: ...


E = TypeVar("E", bound=_End)


class SlotPlane(Generic[E]):
    """The shared state of a slot plane; ``_end`` is the live stream's link end (of type ``E``)."""

    name: str
    device_slots = False
    """The slots' rows live in GPU memory (``LinkGeometry.device_slots``): they always carry values."""
    values_only = False
    """The plane moves activations: a link with emulated compute (``shape_only``) is refused."""

    def __init__(
        self,
        spec: LinkSpec,
        stream: Any,
        codec: Executor,
        inner: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
    ) -> None:
        if self.values_only and spec.shape_only:
            raise InvalidArgument(f"the {self.name} data plane moves activations: not with emulated compute")
        self.spec = spec
        self.stream = stream
        """The link's ``DuplexStream`` (``open()`` gives the live session, ``peer`` names the expert)."""
        self.inner = inner
        self._codec = codec
        self.slots = slots
        self.geometry: LinkGeometry | None = None
        """Set by the first dispatch (its routing gives top-k)."""
        self.max_rows = 0
        self.peer_timeout_s = peer_timeout_s
        self._end: E | None = None
        self._session: object = None
        self._hidden_bytes = 0
        """Bytes of rows the slots carried (the others went through ``inner``)."""

    def _quarantined(self) -> int:
        """Slots this plane's link ends keep for abandoned dispatches (beyond ``inner``'s)."""
        return 0

    @property
    def stats(self) -> PlaneStats:
        inner = self.inner.stats
        return PlaneStats(
            region_hidden_bytes=inner.region_hidden_bytes + self._hidden_bytes,
            inline_hidden_bytes=inner.inline_hidden_bytes,
            result_ref_bytes=inner.result_ref_bytes + self._hidden_bytes,
            quarantined=inner.quarantined + self._quarantined(),
        )

    def _slot_bytes(self) -> int:
        return slot_bytes_for(self.spec, self.slots)

    def _geometry(self, top_k: int) -> LinkGeometry:
        if self.geometry is None or self.geometry.top_k != top_k:
            spec = self.spec
            self.geometry = LinkGeometry(
                slots=self.slots,
                slot_bytes=self._slot_bytes(),
                hidden_size=spec.hidden_size,
                top_k=top_k,
                itemsize=spec.dtype.itemsize,
                device_slots=self.device_slots,
            )
            self.max_rows = self.geometry.max_rows(shape_only=spec.shape_only and not self.device_slots)
        return self.geometry

    def stream_opened(self) -> None:
        self.inner.stream_opened()

    def stream_ended(self) -> None:
        self.inner.stream_ended()
        if self._end is not None:
            self._end.fail(Unavailable(f"{self.stream.peer}: stream ended"))
