"""CUDA stream discipline of the services' threads.

Each service thread that issues GPU work (an attention rank's compute thread, an expert rank's compute
thread, the codec threads that move activations) runs on its own CUDA stream, so copies for one
micro-batch never queue behind the other micro-batch's kernels. Work handed from one thread to another
carries a ``ready`` event recorded on the producer's stream; the consumer waits for that event on its own
stream (never a device-wide synchronisation). On CPU all of this is a no-op.

A tensor handed back without its producer's host having waited for it (the GPU fast plane's results:
their copy out of the slot waits on a ready flag on a stream) carries its event with it
(``attach_ready``); whoever reads it on another stream waits for it first (``wait_attached``, as
``asap.model.placement.combine`` does).
"""

from __future__ import annotations

import torch

__all__ = ["attach_ready", "attached_ready", "ready_event", "use_own_stream", "wait_attached"]


def use_own_stream(device: str | torch.device) -> None:
    """Thread initializer: make a new stream of ``device`` this thread's current stream (CUDA only)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        if dev.index is not None:
            torch.cuda.set_device(dev)
        stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        torch.cuda.set_stream(stream)
        from asap.dataplane.gpu_streams import critical  # (the data plane imports this module)

        critical(stream)  # no GPU fast-plane wait may share its hardware queue


def ready_event(device: str | torch.device, *, timing: bool = False) -> torch.cuda.Event | None:
    """An event recorded on this thread's current stream of ``device`` (CUDA), else None; ``timing``:
    one that ``elapsed_time`` can measure from."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=timing)  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(dev))
    return event


_READY_ATTR = "_asap_ready"


def attach_ready(t: torch.Tensor, event: torch.cuda.Event) -> torch.Tensor:
    """Mark ``t`` as complete only once ``event`` has passed; returns ``t``."""
    setattr(t, _READY_ATTR, event)
    return t


def attached_ready(t: torch.Tensor) -> torch.cuda.Event | None:
    """The event ``attach_ready`` gave ``t``, if any."""
    event: torch.cuda.Event | None = getattr(t, _READY_ATTR, None)
    return event


def wait_attached(t: torch.Tensor) -> None:
    """Make this thread's current stream wait for ``t``'s attached event, if it has one (no host wait)."""
    event = attached_ready(t)
    if event is not None:
        torch.cuda.current_stream(t.device).wait_event(event)
