"""Host costs a real cluster pays and a simulation's devices and links do not.

A process cluster pays, beyond the modelled compute and transfers, host time on every layer's control
path (gRPC, Python, thread hand-offs: the "per-layer cost beyond the model" that
``benchmarks/emulated_layer_cost.py`` measures on the real services), and that time varies from layer to
layer (the host's scheduling and load). ``asap simulate`` models it per attention rank and layer
(``HostDelay``): each time a rank sends a layer's dispatches they leave after a host delay drawn from a
shifted exponential of the measured mean (``--dispatch-overhead-us``) and spread (``--host-jitter-us``;
0: the mean every time). One draw per rank and layer, shared by all of that layer's dispatches, as one
process's control path delays all of them. The spread matters where the services wait for several
ranks at once: the sync barrier releases a (step, layer) only when the last participant's dispatch is in,
so it pays the *slowest* of N draws (for N = 8 and an exponential tail of spread s: ``s (H_8 - 1)`` =
1.72 s above the mean); async waits for one rank's own draw. No per-mode term: the difference between
the modes comes from what waits for how many ranks.

``--barrier-overhead-us`` (``HostCostBarrier``) is the older, fitted alternative for the same gap: a
constant charged at every barrier release. All default to 0 (devices and links only);
benchmarks/README.md says how the values for this host's emulated cluster were measured.
"""

from __future__ import annotations

import asyncio
import random

from asap.errors import InvalidArgument
from asap.syncstep import SyncStep
from expert_svc.barrier import StepBarrier

__all__ = ["HostCostBarrier", "HostDelay"]


class HostDelay:
    """One rank's host delay per layer (see the module doc): ``mean_s`` on average, ``jitter_s`` its
    standard deviation (a shifted exponential: ``mean_s - jitter_s`` plus an exponential of mean
    ``jitter_s``; ``jitter_s <= mean_s``). Calls at the same virtual instant ``now`` (the dispatches of one
    layer, sent together) get the same draw; ``seed`` makes a rank's draws reproducible."""

    def __init__(self, mean_s: float, jitter_s: float = 0.0, seed: int = 0) -> None:
        if mean_s < 0 or jitter_s < 0:
            raise InvalidArgument(f"host delay mean and jitter must be >= 0, got {mean_s} and {jitter_s}")
        if jitter_s > mean_s:
            raise InvalidArgument(
                f"host jitter {jitter_s * 1e6:g} us exceeds the mean {mean_s * 1e6:g} us: a shifted "
                "exponential of that spread would need negative delays"
            )
        self.mean_s, self.jitter_s = mean_s, jitter_s
        self._random = random.Random(seed)
        self._at: float | None = None
        self._drawn = mean_s

    def __call__(self, now: float) -> float:
        if self.jitter_s == 0:
            return self.mean_s
        if now != self._at:
            self._at = now
            self._drawn = self.mean_s - self.jitter_s + self._random.expovariate(1.0 / self.jitter_s)
        return self._drawn


class HostCostBarrier(StepBarrier):
    """The expert rank's own ``StepBarrier``, its release charged ``host_s`` of host time (the same for
    every chunk of the group, so the group still leaves together)."""

    def __init__(self, host_s: float, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s)
        self.host_s = host_s

    async def wait(
        self, *, sync: SyncStep, layer: int, attention_rank: int, rows: int, total_rows: int
    ) -> int:
        waited_ns = await super().wait(
            sync=sync, layer=layer, attention_rank=attention_rank, rows=rows, total_rows=total_rows
        )
        if self.host_s > 0:
            await asyncio.sleep(self.host_s)
        return waited_ns + round(self.host_s * 1e9)
