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

Where the ranks' processes share a few host cores (the emulated cluster: 13 processes on this VM's 2
cores), part of that delay is CPU work that queues for a core (``HostCores``, ``--host-cores``,
``--host-cpu-us``): ranks that run their layer's host path at the same instant, as the sync modes' ranks
do after every barrier release, wait for each other's CPU work; ranks that run staggered, as async's do,
rarely wait. The default (no shared cores) is a host per rank, as on real servers.

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

__all__ = ["HostCores", "HostCostBarrier", "HostDelay"]


class HostCores:
    """``cores`` host CPU cores shared by every rank's host path: work runs on the core free first, in
    order of submission; ``busy_s`` adds up the work (for the run's host CPU busy fraction)."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise InvalidArgument(f"host cores must be >= 1, got {cores}")
        self._free_at = [0.0] * cores
        self.busy_s = 0.0

    @property
    def cores(self) -> int:
        return len(self._free_at)

    def run(self, now: float, work_s: float) -> float:
        """Seconds from ``now`` until ``work_s`` of CPU work submitted now is done."""
        core = min(range(len(self._free_at)), key=self._free_at.__getitem__)
        end = max(now, self._free_at[core]) + work_s
        self._free_at[core] = end
        self.busy_s += work_s
        return end - now


class HostDelay:
    """One rank's host delay per layer (see the module doc): ``mean_s`` on average, ``jitter_s`` its
    standard deviation (a shifted exponential: ``mean_s - jitter_s`` plus an exponential of mean
    ``jitter_s``; ``jitter_s <= mean_s``). Calls at the same virtual instant ``now`` (the dispatches of one
    layer, sent together) get the same draw; ``seed`` makes a rank's draws reproducible. With ``cores``,
    ``cpu_s`` of each layer's delay is CPU work on those shared cores: the delay grows by the time that
    work waits for a core."""

    def __init__(
        self,
        mean_s: float,
        jitter_s: float = 0.0,
        seed: int = 0,
        cores: HostCores | None = None,
        cpu_s: float = 0.0,
    ) -> None:
        if mean_s < 0 or jitter_s < 0 or cpu_s < 0:
            raise InvalidArgument(f"host delay mean and jitter must be >= 0, got {mean_s} and {jitter_s}")
        if jitter_s > mean_s:
            raise InvalidArgument(
                f"host jitter {jitter_s * 1e6:g} us exceeds the mean {mean_s * 1e6:g} us: a shifted "
                "exponential of that spread would need negative delays"
            )
        if cpu_s > mean_s:
            raise InvalidArgument(
                f"host CPU work {cpu_s * 1e6:g} us exceeds the mean delay {mean_s * 1e6:g} us"
            )
        self.mean_s, self.jitter_s = mean_s, jitter_s
        self.cores, self.cpu_s = cores, cpu_s if cores is not None else 0.0
        self._random = random.Random(seed)
        self._at: float | None = None
        self._drawn = mean_s

    @property
    def constant(self) -> bool:
        """The same delay every time (no spread, no shared cores)."""
        return self.jitter_s == 0 and self.cores is None

    def __call__(self, now: float) -> float:
        if self.constant:
            return self.mean_s
        if now != self._at:
            self._at = now
            drawn = self.mean_s
            if self.jitter_s > 0:
                drawn += self._random.expovariate(1.0 / self.jitter_s) - self.jitter_s
            if self.cores is not None:  # the CPU part queues for a shared core, the rest is latency
                drawn += self.cores.run(now, self.cpu_s) - self.cpu_s
            self._drawn = drawn
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
