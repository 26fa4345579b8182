"""The NIXL plane's hot path (``asap.dataplane.direct``): the attention compute thread posts a dispatch's
WRITE itself and takes the completions itself, so a layer's round trip has no thread hop on this side
(before: event loop -> codec thread for the copy into the slot -> event loop, and poll thread -> event
loop -> compute thread for the answer).

There is no doorbell to sleep on (NIXL delivers notifications only to a caller that asks), so ``park``
gives no file descriptor: the compute thread looks again after ``SHORT_PARK_S`` at most, and while it
does so the process's NIXL poll thread leaves this end's notifications to it (it still watches the
peer's heartbeat). Dispatches larger than a slot go through the plane's ``inner`` path on the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asap.dataplane.direct import Ticket
from asap.dataplane.nixl_attention import NixlAttentionEnd
from asap.dataplane.plane import PlaneRequest
from asap.dataplane.slot_direct import SlotDirect

if TYPE_CHECKING:
    from asap.dataplane.nixl_plane import NixlPlane

__all__ = ["NixlDirect"]


class NixlDirect(SlotDirect[Any, NixlAttentionEnd]):
    """``DirectLink`` of a NIXL plane for one batch, bound to one connected end."""

    plane: NixlPlane  # not a type argument: nixl_plane imports this module

    def _send(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        seq, _ = self.plane.send(self.end, slot, request, ticket)
        return seq

    def poll(self) -> None:
        """Take the end's arrived completions (and move its WRITEs on) on this thread."""
        self.end.poll(time.monotonic_ns(), sweeper=False)

    def park(self, on: bool) -> Sequence[int]:
        """No descriptor to wait on (look again soon); while parked the poll thread leaves the end's
        notifications to this thread."""
        end = self.end
        end.polled_elsewhere = end.polled_elsewhere + 1 if on else max(0, end.polled_elsewhere - 1)
        return []
