"""Virtual devices: the compute and codec executors the simulated services run on.

A service's executor (``AttentionExecutor``, ``ExpertExecutor``) sends its torch work to one thread, in
order; with emulated compute that work only *sleeps* for the modelled time (``asap.emulation.parts``,
through the part's ``Sleeper``). Here the thread is a ``DeviceQueue``: the work runs at once, inline,
with a ``ChargeSleeper`` that adds up what the part would have slept instead of sleeping; the result is
delivered when the device has spent that long on it, on the virtual clock.

A queue occupies one or more ``Device`` objects, and every device runs one piece of work at a time in
the order it was submitted (from any queue): an attention rank with tensor parallelism N occupies its N
devices together; in the colocated layout an expert rank's queue shares its device with an attention
rank's, so their compute serialises as it does on one real accelerator.

``Inline`` is the zero-cost executor for the codec threads (encoding a shape-only chunk costs nothing
the emulation models).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from asap.emulation.clock import Sleeper

__all__ = ["ChargeSleeper", "Device", "DeviceQueue", "Inline"]

T = TypeVar("T")


class ChargeSleeper(Sleeper):
    """A ``Sleeper`` that does not sleep: it adds every requested duration to ``pending``."""

    def __init__(self) -> None:
        super().__init__(bias_s=0.0)
        self.pending = 0.0

    def begin(self, *, keep_pending: bool = False, at: float | None = None) -> None:
        """Nothing to note: a charge is its duration, whenever the work started (``Sleeper.begin``
        moves a real sleep's deadline; this sleeper never waits)."""

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.requested_s += seconds
            self.pending += seconds

    def take(self) -> float:
        """What was charged since the last ``take``."""
        charged, self.pending = self.pending, 0.0
        return charged


@dataclass(slots=True, eq=False)
class Device:
    """One simulated accelerator: when it is free again, and how long it has been busy."""

    name: str
    free_at: float = 0.0
    busy_s: float = 0.0
    jobs: int = 0


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DeviceQueue(concurrent.futures.Executor):
    """A service's compute thread on virtual devices (see the module doc). ``sleeper`` is the one its
    emulated part charges; ``scale`` multiplies every charge (1 = the modelled time)."""

    def __init__(self, devices: Sequence[Device], sleeper: ChargeSleeper, *, scale: float = 1.0) -> None:
        if not devices:
            raise ValueError("a device queue needs at least one device")
        self.devices = list(devices)
        self.sleeper = sleeper
        self.scale = scale
        self.busy_s = 0.0
        """Device-seconds this queue's work has held its devices (its cost times the devices it spans):
        its share of their ``busy_s`` when another queue runs on them too (the colocated layout)."""

    def schedule(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Run ``fn(*args)`` now; its result (or error) arrives once the devices have run it."""
        future: asyncio.Future[T] = loop.create_future()
        self.sleeper.take()  # nothing charged outside a job counts
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:  # delivered to the awaiting task, as a thread's failure would be
            error = exc
        cost = self.sleeper.take() * self.scale
        now = loop.time()
        start = now
        for device in self.devices:
            if device.free_at > start:
                start = device.free_at
        end = start + cost
        self.busy_s += cost * len(self.devices)
        for device in self.devices:
            device.free_at = end
            device.busy_s += cost
            device.jobs += 1
        if end <= now:
            loop.call_soon(_settle, future, result, error)
        else:
            loop.call_at(end, _settle, future, result, error)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class Inline(concurrent.futures.Executor):
    """Runs work at once and returns it done: a codec thread that costs nothing and is never behind (its
    awaiting task goes on without a loop iteration: one event less per encode and decode)."""

    def schedule(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = loop.create_future()
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None
