"""A rank's hosted experts as a cheap check of routing tables (every dispatch's ids pass it twice).

An expert rank checks each dispatch's ids [N, K] before queueing it (``ExpertExecutor.validate``) and
its part checks them again when computing (the emulated part also counts rows per expert). Placements
give each rank a contiguous block of experts, and the planes deliver int32 ids, so the usual check is
two reductions over the ids read as unsigned (no lookup per id, no copy): ``HostedIds.all_hosted``.
When it cannot tell (int64 ids, a scattered block) or an id fails, the callers run their full checks,
which say what is wrong; so errors and their messages do not depend on this shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["HostedIds"]

_ONE = np.uint32(1)


class HostedIds:
    """The experts ``hosted`` (global ids) of a model with ``num_experts`` routed experts."""

    __slots__ = ("contiguous", "high", "low")

    def __init__(self, hosted: Sequence[int], num_experts: int) -> None:
        ids = sorted({int(e) for e in hosted})
        inside = bool(ids) and ids[0] >= 0 and ids[-1] < num_experts
        self.low = ids[0] if ids else 0
        self.high = ids[-1] + 1 if ids else 0
        self.contiguous = inside and self.high - self.low == len(ids)
        """The hosted experts are the block ``[low, high)`` (what ``ExpertPlacement`` makes)."""

    def all_hosted(self, ids: np.ndarray) -> bool:  # type: ignore[type-arg]
        """True when every id of the int32 table ``ids`` is -1 or a hosted expert; False when that is
        not known this way (not int32, not a contiguous block, or some id is neither): run the full check.

        Read as unsigned, a valid id is in ``[low, high)`` and -1 is the largest value, which ``+ 1``
        wraps to 0: so ``min >= low`` excludes the ids below the block (negative ones read as large),
        and ``max(id + 1) <= high`` the ids above it and below -1."""
        if ids.dtype != np.int32 or not self.contiguous:
            return False
        if ids.size == 0:
            return True
        flat = ids.reshape(-1).view(np.uint32)
        return int(np.minimum.reduce(flat)) >= self.low and int(np.maximum.reduce(flat + _ONE)) <= self.high

    def totals(self, ids: np.ndarray) -> tuple[int, int]:  # type: ignore[type-arg]
        """(slots that are not -1, hosted experts with at least one slot) of a table that passed
        ``all_hosted``: what a modelled expert call's time depends on (``asap.emulation.costs``)."""
        flat = ids.reshape(-1)
        used = flat[flat >= 0]
        if used.size == 0:
            return 0, 0
        per_expert = np.bincount(used - self.low, minlength=self.high - self.low)
        return int(used.size), int(np.count_nonzero(per_expert))
