"""Host costs a real cluster pays and a simulation's devices and links do not: calibration knobs.

A process cluster pays, beyond the modelled compute and transfers, host time per layer (gRPC, Python,
thread hand-offs), and in the sync modes more of it at every barrier: the (step, layer) waits for the
slowest of the attention processes, each delayed by its host's jitter, and the expert process then wakes
every participant's stream at once. ``asap simulate`` charges the first on every dispatch's link
(``--dispatch-overhead-us``) and the second here, once per barrier release (``--barrier-overhead-us``):
every chunk of a released (step, layer) continues that much later. Both default to 0 (devices and links
only); benchmarks/README.md says how the values for this host's emulated cluster were measured.
"""

from __future__ import annotations

import asyncio

from asap.syncstep import SyncStep
from expert_svc.barrier import StepBarrier

__all__ = ["HostCostBarrier"]


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
