"""The global step of the synchronous modes, as one value.

In ``sync`` and ``sync-chunked`` the scheduler runs global steps: every attention rank takes part in step
``step`` (an idle rank with an empty batch), and every expert rank waits at each MoE layer for the
dispatches of all ``participants`` attention ranks before it computes (the per-layer barrier of DP+EP).
Async mode has no step: code passes ``None`` where a ``SyncStep`` would go.

On the wire (``RunBatch``, ``DispatchChunk``) a step travels as two fields, ``step`` and
``sync_participants``, with 0 participants meaning async; ``from_wire`` and ``to_wire`` are the only
translation between the two forms.
"""

from __future__ import annotations

from dataclasses import dataclass

from asap.errors import InvalidArgument

__all__ = ["SyncStep"]


@dataclass(frozen=True, slots=True)
class SyncStep:
    """One global step: its id and how many attention ranks take part in it."""

    step: int
    """Id of the step (increasing per scheduler)."""
    participants: int
    """Attention ranks in the step; each expert rank's barrier waits for this many dispatches."""

    def __post_init__(self) -> None:
        if self.step < 0:
            raise InvalidArgument(f"sync step id must be >= 0, got {self.step}")
        if self.participants < 1:
            raise InvalidArgument(f"a sync step needs >= 1 participant, got {self.participants}")

    @classmethod
    def from_wire(cls, step: int, participants: int) -> SyncStep | None:
        """The step carried by a message's ``step``/``sync_participants`` fields (``None``: async)."""
        return cls(step, participants) if participants else None

    @staticmethod
    def to_wire(sync: SyncStep | None) -> tuple[int, int]:
        """``(step, sync_participants)`` for a message; ``(0, 0)`` for async."""
        return (sync.step, sync.participants) if sync is not None else (0, 0)
