"""Registered buffers a NIXL link end reuses, one per key (a slot), registered once and cached by key.

Why: a WRITE from memory allocated for it pays twice per layer: the registration of that memory
(0.2-3.3 ms for 32 MB on this host, by load) and its page faults (a fresh [8192, 2048] output: 22-25 ms
to fault in with one thread), and it sends from cold pages. A buffer per slot, sized for the most rows a
slot can carry, is faulted in once (``torch.empty`` touches nothing until it is written) and stays
registered until the end closes. One buffer per slot is enough: an answer for slot ``s`` is only
computed once the attention rank reused ``s``, i.e. after it took the previous answer's notification,
which NIXL delivers after that WRITE's data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RegisteredBuffers"]


class RegisteredBuffers:
    """Lazily made buffers of ``nbytes`` each on ``device``, registered with ``register`` (which returns
    the registration handle) and deregistered with ``deregister`` at ``close``."""

    def __init__(
        self,
        nbytes: int,
        device: torch.device,
        register: Callable[[torch.Tensor], Any],
        deregister: Callable[[Any], None],
    ) -> None:
        self.nbytes = nbytes
        self.device = device
        self._register = register
        self._deregister = deregister
        self._buffers: dict[int, tuple[torch.Tensor, Any]] = {}
        self._lock = threading.Lock()
        self.registrations = 0
        """How many buffers were registered (one per key, ever: the cache's point)."""

    def get(self, key: int) -> torch.Tensor:
        """The ``nbytes`` uint8 buffer of ``key``, made and registered on first use."""
        with self._lock:
            got = self._buffers.get(key)
            if got is None:
                buf = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
                got = (buf, self._register(buf))
                self._buffers[key] = got
                self.registrations += 1
            return got[0]

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lies inside one of these buffers (a WRITE from it needs no registration)."""
        start = int(tensor.data_ptr())
        end = start + tensor.numel() * tensor.element_size()
        with self._lock:
            for buf, _ in self._buffers.values():
                base = int(buf.data_ptr())
                if base <= start and end <= base + self.nbytes:
                    return True
        return False

    def close(self) -> None:
        """Deregister and drop every buffer (the end is closing; no WRITE reads them any more)."""
        with self._lock:
            buffers, self._buffers = self._buffers, {}
        for _, registered in buffers.values():
            self._deregister(registered)
