"""What every expert-side link end shares (a fast link end, ``expert_svc.fastlane``, and a NIXL link
end, ``expert_svc.nixl_lane``, speak the same slot/descriptor protocol): rejecting a dispatch it cannot
use with an error completion for that dispatch only, the completion of an answer, and the count of items
the compute thread holds, which keeps a detached end's memory until the last of them is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from asap.dataplane.fastlink import Completion, Request
from asap.dataplane.poller import Sweeper
from asap.errors import AsapError

__all__ = ["LaneEnd", "ServedEnds"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound="LaneEnd")


class LaneEnd:
    """Where a lane's item came from and its answer goes. Subclasses deliver (``_deliver``) and free
    their memory (``_close``); this class decides when, under ``_lock``."""

    kind = "fast"
    """How log lines name the link (``fast``, ``NIXL``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0  # items the compute thread holds
        self._detached = False
        self._closed = False

    def _admit(self, request: Request, make: Callable[[], T]) -> T | None:
        """The item ``make`` builds of ``request``, now held; ``None`` if it was rejected (and answered)."""
        try:
            item = make()
        except AsapError as exc:
            logger.warning(
                "rejected %s dispatch mb=%d layer=%d: %s",
                self.kind,
                request.micro_batch,
                request.layer,
                exc.message,
            )
            self.answer(request, None, error=exc)
            return None
        with self._lock:
            self._held += 1
        return item

    def answer(
        self,
        request: Request,
        out: torch.Tensor | None,
        *,
        error: AsapError | None = None,
        queue_ns: int = 0,
        compute_ns: int = 0,
        picked_unix_ns: int = 0,
    ) -> None:
        """Write the results over the rows (or the error text into the slot header) and send the
        completion; any thread. Nothing is written once the end is closed."""
        completion = Completion.answering(
            request, error, queue_ns=queue_ns, compute_ns=compute_ns, picked_unix_ns=picked_unix_ns
        )
        with self._lock:
            if self._closed:
                return
            self._deliver(request, out, error, completion)

    def result_rows(self, request: Request) -> torch.Tensor | None:
        """Where to compute ``request``'s results ([rows, H], the model dtype), if this end sends them
        from memory of its own (the NIXL end: registered, reused); ``None``: a new tensor per call."""
        return None

    def _deliver(
        self, request: Request, out: torch.Tensor | None, error: AsapError | None, completion: Completion
    ) -> None:
        """Write and send one answer (under ``_lock``, the end open)."""
        raise NotImplementedError

    def release(self) -> None:
        """The compute thread is done with one item of this link."""
        with self._lock:
            self._held -= 1
            close = self._detached and self._held <= 0
        if close:
            self._close()

    def _shut(self) -> bool:
        """Mark the end closed; ``False`` if it already was (the caller then frees nothing)."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        return True

    def detach(self) -> None:
        """The lane stopped serving this end; its memory goes once no item of it is held."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class ServedEnds(Generic[E]):
    """The link ends of one lane and the poll thread serving them (set by the lane: ``poller``)."""

    poller: Sweeper[Any]
    ends: set[E]

    def _serve(self, end: E) -> E:
        self.ends.add(end)
        self.poller.add(end)
        return end

    def detach(self, end: E) -> None:
        """Stop serving ``end`` (any thread); its memory goes once the compute thread lets go of it."""
        self.ends.discard(end)
        self.poller.remove(end)
        end.detach()

    def close(self) -> None:
        for end in list(self.ends):
            self.detach(end)
        self.poller.stop()
