"""The wire of the attention end of a NIXL link (``asap.dataplane.nixl_attention``): the notifications
that carry a dispatch's ``Request`` and the expert's ``Completion``, and the WRITE of a dispatch into the
peer's slot in the fast link's layout (``asap.dataplane.fastlink``).

Host slots take one WRITE from two sources: header and routing (ids, weights: 64 bytes a row) copied into
this end's slot, the rows from the tensor they already live in (registered for the WRITE, not copied).
GPU slots take a copy of everything into the slot (``fill_slot``): registering GPU memory per call pins it.
"""

from __future__ import annotations

import struct

import torch

from asap.dataplane.fastlink import SLOT_HEADER_BYTES, Completion, LinkGeometry, Request, SlotHeader
from asap.dataplane.nixl_link import NixlEnd

__all__ = [
    "COMPLETION_BYTES",
    "COMPLETION_TAG",
    "completion_notification",
    "fill_slot",
    "request_notification",
    "write_dispatch",
]

_REQUEST_TAG = b"R"
COMPLETION_TAG = b"C"
COMPLETION_BYTES = 1 + struct.calcsize("<QIIIIQQQQ")
"""A completion notification's length: its tag and the packed ``Completion``."""


def request_notification(request: Request) -> bytes:
    return _REQUEST_TAG + request.pack()


def completion_notification(completion: Completion) -> bytes:
    return COMPLETION_TAG + completion.pack()


def _routing_into(
    slot: torch.Tensor, geometry: LinkGeometry, rows: int, ids: torch.Tensor, w: torch.Tensor
) -> None:
    _, ids_at, weights_at, _ = geometry.payload(rows, shape_only=False)
    k = rows * geometry.top_k * 4
    slot[ids_at : ids_at + k].copy_(
        ids.detach().to(dtype=torch.int32).contiguous().view(-1).view(torch.uint8)
    )
    slot[weights_at : weights_at + k].copy_(
        w.detach().to(dtype=torch.float32).contiguous().view(-1).view(torch.uint8)
    )


def _header_into(slot: torch.Tensor, header: SlotHeader) -> None:
    raw = bytearray(SLOT_HEADER_BYTES)
    header.write(memoryview(raw), 0)
    slot[:SLOT_HEADER_BYTES].copy_(torch.frombuffer(raw, dtype=torch.uint8))


def fill_slot(
    slot: torch.Tensor,
    geometry: LinkGeometry,
    dtype: torch.dtype,
    header: SlotHeader,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
) -> int:
    """Write one dispatch into ``slot`` (its bytes, host or GPU) in the fast link's layout; returns the
    end of what was written (the WRITE's length). The GPU path; host slots use ``write_dispatch``."""
    rows = header.rows
    hidden_at, _, _, end = geometry.payload(rows, shape_only=False)
    _header_into(slot, header)
    if rows:
        n = rows * geometry.hidden_size * dtype.itemsize
        slot[hidden_at : hidden_at + n].view(dtype).view(rows, geometry.hidden_size).copy_(hidden)
        _routing_into(slot, geometry, rows, expert_ids, weights)
    return end


def write_dispatch(
    end: NixlEnd,
    slot: int,
    dtype: torch.dtype,
    header: SlotHeader,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    notification: bytes,
) -> None:
    """One WRITE of a dispatch from host memory into the peer's ``slot``: header and routing from this
    end's slot, the rows from the memory they already live in (registered for the WRITE; copied only when
    they are not ``dtype`` rows in one block). Any thread."""
    g = end.geometry
    rows = header.rows
    hidden_at, ids_at, _, stop = g.payload(rows, shape_only=False)
    view = end.slot(slot)
    _header_into(view, header)
    base = end.slot_address(slot)
    if not rows:
        end.post(slot, [(base, SLOT_HEADER_BYTES, 0)], notification)
        return
    _routing_into(view, g, rows, expert_ids, weights)
    source = hidden.detach().to(dtype=dtype).contiguous()  # [rows, H]: the dispatch's own rows as a rule
    registered = end.register(source)
    pieces = [
        (base, SLOT_HEADER_BYTES, 0),
        (int(source.data_ptr()), rows * g.hidden_size * dtype.itemsize, hidden_at),
        (base + ids_at, stop - ids_at, ids_at),
    ]
    end.post(slot, pieces, notification, registered=registered, hold=source)
