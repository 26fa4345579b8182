"""A rank's hosted experts as a cheap check of routing tables.

An expert rank checks each dispatch's ids [N, K] before queueing it (``ExpertExecutor.check``).
Placements give each rank a contiguous block of experts, and the planes deliver int32 ids, so the usual
check is a reduction and a count over the ids read as unsigned (no lookup per id): ``HostedIds.counts``,
whose rows per expert the executor hands to its part with the work (``ExpertPart.compute_counted``), so
the part does not check the same ids again (the emulated part's modelled time needs only the counts).
``all_hosted`` is the check alone (two reductions), for a part handed ids without counts.
When it cannot tell (int64 ids, a scattered block) or an id fails, the callers run their full checks,
which say what is wrong; so errors and their messages do not depend on this shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["HostedCounts", "HostedIds", "add_counts"]

_ONE = np.uint32(1)

HostedCounts = tuple[np.ndarray, int]  # type: ignore[type-arg]
"""What a checked table's modelled expert call depends on (``asap.emulation.costs``): per expert of the
hosted block ``[low, high)`` a count (int [high - low]) that is nonzero exactly for the experts with
rows (the rows of every slot, or of the first slots when those name every hosted expert already), and
the table's slots that are not -1."""

_HEAD = 2048
"""``HostedIds.counts``: slots counted first in a table of more than ``2 * _HEAD`` (usually they name
every hosted expert, and the rest need not be counted)."""


def add_counts(counted: list[HostedCounts | None]) -> HostedCounts | None:
    """The counts of the tables ``counted`` stacked (a merged call), None if any is unknown: the sum of
    counts is nonzero where any table's is."""
    first = counted[0]
    if first is None:
        return None
    per_expert, used = first
    for item in counted[1:]:
        if item is None:
            return None
        per_expert = per_expert + item[0]
        used += item[1]
    return per_expert, used


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

    def counts(self, ids: np.ndarray) -> HostedCounts | None:  # type: ignore[type-arg]
        """``HostedCounts`` of the int32 table ``ids`` when every id is -1 or a hosted expert; None when
        that is not known this way (not int32, not a contiguous block, or some id is neither): run the
        full check.

        ``id + 1`` read as unsigned puts -1 at 0 and a hosted id in ``[low + 1, high]``; every other id
        lands above ``high`` (ids below -1 and above the block) or in ``[1, low]`` (below the block). So
        one maximum bounds the count (never a count array sized by a bad id), and the count's first
        ``low + 1`` bins say the rest: bin 0 the -1 slots, bins 1 to ``low`` must be empty."""
        if ids.dtype != np.int32 or not self.contiguous:
            return None
        flat = ids.reshape(-1).view(np.uint32)
        low, high = self.low, self.high
        if flat.size > 2 * _HEAD:
            return self._counts_large(flat)
        shifted = flat + _ONE
        if shifted.size == 0:
            return np.zeros(high - low, dtype=np.intp), 0
        if int(np.maximum.reduce(shifted)) > high:
            return None
        slots = np.bincount(shifted, minlength=high + 1)
        if low and len(slots[1 : low + 1].nonzero()[0]):  # ``nonzero``: C, ``count_nonzero`` a Python call
            return None
        return slots[low + 1 :], shifted.size - int(slots[0])

    def _counts_large(self, flat: np.ndarray) -> HostedCounts | None:  # type: ignore[type-arg]
        """``counts`` of a long table (``flat``: its ids read as unsigned): ``all_hosted``'s reductions
        check it, the slots that are not -1 are counted as nonzero values of ``id + 1``, and only its
        first ``_HEAD`` slots are counted per expert unless they miss a hosted expert (a count costs
        several times a reduction per slot, and most slots of a rank's table are -1)."""
        low, high = self.low, self.high
        if int(np.minimum.reduce(flat)) < low:
            return None
        shifted = flat + _ONE
        if int(np.maximum.reduce(shifted)) > high:
            return None
        slots = np.bincount(shifted[:_HEAD], minlength=high + 1)[low + 1 :]
        if len(slots.nonzero()[0]) < high - low:
            slots = np.bincount(shifted, minlength=high + 1)[low + 1 :]
        return slots, int(np.count_nonzero(shifted))

    def totals(self, ids: np.ndarray) -> tuple[int, int]:  # type: ignore[type-arg]
        """(slots that are not -1, hosted experts with at least one slot) of a table that passed
        ``all_hosted``: what a modelled expert call's time depends on (``asap.emulation.costs``)."""
        flat = ids.reshape(-1)
        used = flat[flat >= 0]
        if used.size == 0:
            return 0, 0
        per_expert = np.bincount(used - self.low, minlength=self.high - self.low)
        return int(used.size), int(np.count_nonzero(per_expert))
