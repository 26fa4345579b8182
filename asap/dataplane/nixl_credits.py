"""Credits and result leases of the attention end of a NIXL link (``asap.dataplane.nixl_attention``).

The end's K slots are its credits (``asap.dataplane.slot_credits``, shared with the CPU fast plane): a
sender takes a free one and it comes back when its answer is taken, or, for a result handed out as a view
of the slot (a lease), when the last tensor on that view is freed. At most ``lease_cap`` slots are leased
at once, so a consumer holding results cannot starve the senders. Once the end is broken, no slot comes
back: an abandoned dispatch's slot may still be written by its peer (the quarantine rule of
``asap.dataplane.link``).
"""

from __future__ import annotations

import threading
from typing import Any

from asap.dataplane.slot_credits import SlotCredits

__all__ = ["NixlSlotCredits"]


class NixlSlotCredits(SlotCredits):
    """The slots of one NIXL attention end as credits, and the accounting of its leased results."""

    def __init__(self, slots: int, *, peer: str, loop: Any, lease_cap: int) -> None:
        # reentrant: a lease's finalizer may run on a thread that holds the lock
        super().__init__(slots, peer=peer, loop=loop, lock=threading.RLock())
        self._leased = 0
        self.lease_cap = lease_cap
        """Results handed out as views of their slot at most at once (the other slots keep cycling, so
        a consumer holding results cannot starve the senders); 0 on GPU slots (copied out)."""
        self.leases = 0
        """Results handed out as views of their slot (not copied)."""

    def _unlease(self, slot: int) -> None:
        """The last tensor on a leased slot was freed (any thread)."""
        with self._lock:
            self._leased -= 1
        self._release(slot)
