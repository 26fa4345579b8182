"""The memory of one attention -> expert fast link: header, two descriptor rings and K fixed slots.

One POSIX shared-memory region per link, created by the attention rank and announced once on the link's
gRPC stream; the expert rank attaches it. Nothing per layer goes through gRPC (DESIGN.md §9):

    0                 link header: magic, version, geometry; one line each for the attention side's
                      heartbeat, the expert side's heartbeat and the closed flags
    4 lines           request ring (attention -> expert): one ``Request`` per dispatch
    ...               completion ring (expert -> attention): one ``Completion`` per answered dispatch
    page aligned      K slots of ``slot_bytes``: a slot header (layer, micro-batch, sequence number,
                      rows, trace context, error text), then the rows [n, H], expert ids [n, K] int32 and
                      routing weights [n, K] float32; the expert writes its results over the rows

Credits: a dispatch holds a slot from its publication until its completion is read (or, abandoned, until
it provably is: ``asap.dataplane.link`` quarantine rules). K slots bound what is outstanding, and both
rings hold K records, so neither ring can overflow. A GPU link (``device_slots``) keeps the header, the rings
and the slot headers in host shared memory and the slots' payload in CUDA IPC memory (``device_nbytes``),
whose first bytes per slot hold the two ready flags (``REQUEST_FLAG_AT``, ``DONE_FLAG_AT``,
``asap.dataplane.gpu_flags``); the payload offsets inside a slot are the same in both memories.
Every field the peer wrote is validated before use (``Request.check``, ``SlotHeader``): a malformed
descriptor fails its dispatch with ``InvalidArgument``, never the rank.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from asap.dataplane.ring import LINE, Ring
from asap.dataplane.words import load_u64, store_u64
from asap.errors import ERRORS_BY_CODE, AsapError, InternalError, InvalidArgument

__all__ = [
    "Completion",
    "LinkGeometry",
    "Request",
    "SlotHeader",
    "error_of",
    "status_of",
]

MAGIC = 0x31545346_50415341  # "ASAPFST1"
VERSION = 1
SLOT_HEADER_BYTES = 1024
_PAGE = 4096
_GEOMETRY = struct.Struct("<QIIQIIII")  # magic, version, slots, slot_bytes, hidden, top_k, itemsize, flags
_DEVICE_SLOTS = 1
"""Geometry flag: the slots' payload lies in CUDA IPC memory (only the slot headers are in the region)."""
REQUEST_FLAG_AT = 0
"""GPU links: offset in a device slot of the u32 the attention stream writes once the rows are in."""
DONE_FLAG_AT = LINE
"""GPU links: offset in a device slot of the u32 the expert stream writes once the results are in."""

HEARTBEAT_ATTENTION = 1 * LINE
HEARTBEAT_EXPERT = 2 * LINE
# line 3: reserved (the rings carry their own closed flags)
_RINGS = 4 * LINE

FLAG_SHAPE_ONLY = 1
"""The dispatch carries no row values (emulated compute): the slot holds ids and weights only."""

_CODES = ("OK", *sorted(ERRORS_BY_CODE))


def status_of(exc: AsapError | None) -> int:
    """The status word of a completion: 0 for success, else the index of the error's code."""
    if exc is None:
        return 0
    return _CODES.index(exc.code) if exc.code in _CODES else _CODES.index(InternalError.code)


def error_of(status: int, message: str) -> AsapError:
    """The error a non-zero completion status stands for."""
    if not 0 < status < len(_CODES):
        return InvalidArgument(f"completion with unknown status {status}: {message}")
    return ERRORS_BY_CODE[_CODES[status]](message)


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, slots=True)
class LinkGeometry:
    """Where everything lies in a link's region."""

    slots: int
    slot_bytes: int
    hidden_size: int
    top_k: int
    itemsize: int
    """Bytes per element of the rows (the model dtype)."""
    device_slots: bool = False
    """GPU link: payload in CUDA IPC memory, ``slot_bytes`` each; the region holds only slot headers."""

    def __post_init__(self) -> None:
        if not 0 < self.slots <= 64:
            raise InvalidArgument(f"a fast link has 1..64 slots, got {self.slots}")
        if self.slot_bytes < SLOT_HEADER_BYTES + _PAGE or self.slot_bytes % _PAGE:
            raise InvalidArgument(
                f"slot size {self.slot_bytes} is not a multiple of {_PAGE} above the header"
            )
        if self.hidden_size <= 0 or self.top_k <= 0 or self.itemsize not in (1, 2, 4, 8):
            raise InvalidArgument(f"bad link geometry {self}")

    @property
    def requests_at(self) -> int:
        return _RINGS

    @property
    def completions_at(self) -> int:
        return _RINGS + _align(Ring.nbytes(self.slots), LINE)

    @property
    def slots_at(self) -> int:
        return _align(self.completions_at + Ring.nbytes(self.slots), _PAGE)

    @property
    def _host_slot_bytes(self) -> int:
        return SLOT_HEADER_BYTES if self.device_slots else self.slot_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the shared-memory region."""
        return self.slots_at + self.slots * self._host_slot_bytes

    def slot_at(self, slot: int) -> int:
        """Offset in the shared-memory region of ``slot`` (its header; with the payload on CPU links)."""
        return self.slots_at + slot * self._host_slot_bytes

    @property
    def device_nbytes(self) -> int:
        """GPU links: bytes of the CUDA IPC memory of the slots (0 otherwise)."""
        return self.slots * self.slot_bytes if self.device_slots else 0

    def device_slot_at(self, slot: int) -> int:
        """GPU links: offset of ``slot`` in the CUDA IPC memory (flags, then payload at ``payload``)."""
        return slot * self.slot_bytes

    def payload(self, rows: int, *, shape_only: bool) -> tuple[int, int, int, int]:
        """Offsets inside a slot of the rows, ids and weights of ``rows`` rows, and the end."""
        hidden = 0 if shape_only else _align(rows * self.hidden_size * self.itemsize, LINE)
        ids = SLOT_HEADER_BYTES + hidden
        weights = ids + _align(rows * self.top_k * 4, LINE)
        return SLOT_HEADER_BYTES, ids, weights, weights + rows * self.top_k * 4

    def max_rows(self, *, shape_only: bool) -> int:
        """The most rows one slot holds."""
        per_row = self.top_k * 8 + (0 if shape_only else self.hidden_size * self.itemsize)
        rows = (self.slot_bytes - SLOT_HEADER_BYTES - 3 * LINE) // per_row
        while self.payload(rows + 1, shape_only=shape_only)[3] <= self.slot_bytes:
            rows += 1
        while rows > 0 and self.payload(rows, shape_only=shape_only)[3] > self.slot_bytes:
            rows -= 1
        return rows

    def write(self, buf: memoryview) -> None:
        _GEOMETRY.pack_into(
            buf,
            0,
            MAGIC,
            VERSION,
            self.slots,
            self.slot_bytes,
            self.hidden_size,
            self.top_k,
            self.itemsize,
            _DEVICE_SLOTS if self.device_slots else 0,
        )

    @classmethod
    def read(cls, buf: memoryview) -> LinkGeometry:
        """The geometry a region's header declares, checked against the region's size."""
        if len(buf) < _GEOMETRY.size:
            raise InvalidArgument("fast link region is too small for its header")
        magic, version, slots, slot_bytes, hidden, top_k, itemsize, flags = _GEOMETRY.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION:
            raise InvalidArgument(
                f"not a fast link region of version {VERSION} (magic {magic:#x}, v{version})"
            )
        if flags & ~_DEVICE_SLOTS:
            raise InvalidArgument(f"fast link region with unknown geometry flags {flags:#x}")
        geometry = cls(slots, slot_bytes, hidden, top_k, itemsize, bool(flags & _DEVICE_SLOTS))
        if geometry.nbytes > len(buf):
            raise InvalidArgument(f"fast link geometry needs {geometry.nbytes} bytes, region has {len(buf)}")
        return geometry


def beat(buf: memoryview, at: int, now_ns: int) -> None:
    """Write a heartbeat word (``time.monotonic_ns``, comparable across processes of one host), in one
    store: the other process loads it meanwhile (``asap.dataplane.words``)."""
    store_u64(buf, at, now_ns)


def heartbeat(buf: memoryview, at: int) -> int:
    """A heartbeat word (0: never written), loaded in one move."""
    return load_u64(buf, at)


_REQUEST = struct.Struct("<QIIIIQQQI")


@dataclass(frozen=True, slots=True)
class Request:
    """The descriptor of one dispatch: which slot holds it, and when it may be taken."""

    micro_batch: int
    layer: int
    slot: int
    rows: int
    flags: int
    seq: int
    """The link's sequence number of this dispatch (also in the slot header: they must agree)."""
    sent_unix_ns: int
    not_before_ns: int
    """Emulated compute: ``time.monotonic_ns`` before which the rows have not arrived (the modelled link
    time of the payload); 0 otherwise."""
    attention_rank: int = 0
    """The sender (for the expert rank's spans)."""

    def pack(self) -> bytes:
        return _REQUEST.pack(
            self.micro_batch,
            self.layer,
            self.slot,
            self.rows,
            self.flags,
            self.seq,
            self.sent_unix_ns,
            self.not_before_ns,
            self.attention_rank,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Request:
        return cls(*_REQUEST.unpack_from(raw))

    @property
    def shape_only(self) -> bool:
        return bool(self.flags & FLAG_SHAPE_ONLY)

    def check(self, geometry: LinkGeometry) -> None:
        """``InvalidArgument`` unless the descriptor names a slot of the link and fits in it."""
        if self.slot >= geometry.slots:
            raise InvalidArgument(f"descriptor names slot {self.slot} of a link with {geometry.slots}")
        if self.flags & ~FLAG_SHAPE_ONLY:
            raise InvalidArgument(f"descriptor with unknown flags {self.flags:#x}")
        if self.payload_end(geometry) > geometry.slot_bytes:
            raise InvalidArgument(
                f"descriptor of {self.rows} rows does not fit a slot of {geometry.slot_bytes} bytes"
            )

    def payload_end(self, geometry: LinkGeometry) -> int:
        return geometry.payload(self.rows, shape_only=self.shape_only)[3]


_COMPLETION = struct.Struct("<QIIIIQQQQ")


@dataclass(frozen=True, slots=True)
class Completion:
    """The answer to one ``Request``: status (error text in the slot header), the expert's timings."""

    micro_batch: int
    layer: int
    slot: int
    status: int
    rows: int
    seq: int
    queue_ns: int
    compute_ns: int
    picked_unix_ns: int
    """When the expert rank's poll thread took the request (``time.time_ns``), for the transfer span."""

    def pack(self) -> bytes:
        return _COMPLETION.pack(
            self.micro_batch,
            self.layer,
            self.slot,
            self.status,
            self.rows,
            self.seq,
            self.queue_ns,
            self.compute_ns,
            self.picked_unix_ns,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Completion:
        return cls(*_COMPLETION.unpack_from(raw))

    @classmethod
    def answering(
        cls, request: Request, error: AsapError | None, *, queue_ns: int, compute_ns: int, picked_unix_ns: int
    ) -> Completion:
        """The completion of ``request`` (``error`` or success), as every link end sends it."""
        return cls(
            micro_batch=request.micro_batch,
            layer=request.layer,
            slot=request.slot,
            status=status_of(error),
            rows=request.rows,
            seq=request.seq,
            queue_ns=queue_ns,
            compute_ns=compute_ns,
            picked_unix_ns=picked_unix_ns,
        )


_SLOT = struct.Struct("<QQIIQHHH")  # micro_batch, seq, layer, rows, sent_unix_ns, tp len, ts len, err len
_TRACEPARENT_AT = 64
_TRACESTATE_AT = 128
_TRACESTATE_MAX = 448
_ERROR_AT = 576
_ERROR_MAX = SLOT_HEADER_BYTES - _ERROR_AT


@dataclass(frozen=True, slots=True)
class SlotHeader:
    """The slot's own header: what the dispatch is (checked against its descriptor) and its trace."""

    micro_batch: int
    seq: int
    layer: int
    rows: int
    sent_unix_ns: int
    traceparent: str = ""
    tracestate: str = ""

    def write(self, buf: memoryview, at: int) -> None:
        tp = self.traceparent.encode()[:64]
        ts = self.tracestate.encode()
        if len(ts) > _TRACESTATE_MAX:
            ts = b""  # a trace state that does not fit is dropped, never truncated mid-entry
        _SLOT.pack_into(
            buf, at, self.micro_batch, self.seq, self.layer, self.rows, self.sent_unix_ns, len(tp), len(ts), 0
        )
        buf[at + _TRACEPARENT_AT : at + _TRACEPARENT_AT + len(tp)] = tp
        buf[at + _TRACESTATE_AT : at + _TRACESTATE_AT + len(ts)] = ts

    @classmethod
    def read(cls, buf: memoryview, at: int, request: Request) -> SlotHeader:
        """The header of ``request``'s slot; ``InvalidArgument`` when it does not match the descriptor."""
        micro_batch, seq, layer, rows, sent, tp_len, ts_len, _ = _SLOT.unpack_from(buf, at)
        if (micro_batch, seq, layer, rows) != (request.micro_batch, request.seq, request.layer, request.rows):
            raise InvalidArgument(
                f"slot {request.slot} header (mb={micro_batch} seq={seq} layer={layer} rows={rows}) does not "
                f"match its descriptor (mb={request.micro_batch} seq={request.seq} layer={request.layer} "
                f"rows={request.rows})"
            )
        if tp_len > 64 or ts_len > _TRACESTATE_MAX:
            raise InvalidArgument(f"slot {request.slot} header has a trace context of bad length")
        try:
            tp = bytes(buf[at + _TRACEPARENT_AT : at + _TRACEPARENT_AT + tp_len]).decode()
            ts = bytes(buf[at + _TRACESTATE_AT : at + _TRACESTATE_AT + ts_len]).decode()
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"slot {request.slot} header has a trace context that is not text"
            ) from None
        return cls(micro_batch, seq, layer, rows, sent, tp, ts)


def write_error(buf: memoryview, at: int, message: str) -> None:
    """The error text of a failed dispatch, into its slot header (the completion carries the status)."""
    raw = message.encode()[: _ERROR_MAX - 2]
    struct.pack_into("<H", buf, at + _ERROR_AT, len(raw))
    buf[at + _ERROR_AT + 2 : at + _ERROR_AT + 2 + len(raw)] = raw


def read_error(buf: memoryview, at: int) -> str:
    (n,) = struct.unpack_from("<H", buf, at + _ERROR_AT)
    n = min(n, _ERROR_MAX - 2)
    return bytes(buf[at + _ERROR_AT + 2 : at + _ERROR_AT + 2 + n]).decode(errors="replace")
