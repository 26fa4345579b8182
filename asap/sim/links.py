"""Network ports of the simulated devices: an all-to-all's transfers share each device's port.

Without it (``--links pair``, what the multi-process emulated cluster does) every dispatch and every
combine result is charged ``bytes / link_gbps`` on its own, all of them in parallel, so a rank that sends
its batch's rows to 32 expert ranks pays only its largest single transfer: as if each device had a link
of its own to every peer. In a real DP+EP deployment over several servers a device's transfers to all its
peers share its one network port (``DeviceProfile.port_gbps``), so a rank's dispatch (and an expert rank's
combine) takes its total bytes over the port, as the all-to-all libraries' per-rank bandwidth figures
count it (DeepEP: bytes one rank sends or receives, over the NIC's ~50 GB/s).

``Ports`` holds one egress port per device. A transfer from a group of devices (an attention rank with
tensor parallelism sends from all of its devices, each 1/N of the rows, as sequence-parallel MoE dispatch
does) to a group of devices queues on each sending port in order of submission; a transfer to a device
of the sending group itself (the colocated layout: an expert rank on one of the attention rank's own
devices) stays on the device and costs nothing. The receiving side's ports are not modelled (in these
layouts every device sends about as much as it receives); nor is contention inside the switch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asap.emulation.profiles import DeviceProfile
from asap.errors import InvalidArgument
from asap.sim.devices import Device

__all__ = ["LINK_MODELS", "Ports"]

LINK_MODELS = ("pair", "ports")


@dataclass(slots=True, eq=False)
class _Port:
    free_at: float = 0.0
    busy_s: float = 0.0


class Ports:
    """Egress ports of the devices (see the module doc); ``delay`` is what one transfer takes from now."""

    def __init__(self, profile: DeviceProfile) -> None:
        if profile.port_gbps is None:
            raise InvalidArgument(f"profile {profile.name} has no port_gbps: --links ports needs one")
        self.bytes_per_s = profile.port_gbps * 1e9
        self.latency_s = profile.link_latency_us * 1e-6
        self._ports: dict[int, _Port] = {}

    def _port(self, device: Device) -> _Port:
        port = self._ports.get(id(device))
        if port is None:
            port = self._ports[id(device)] = _Port()
        return port

    def delay(self, now: float, sources: Sequence[Device], targets: Sequence[Device], nbytes: int) -> float:
        """Seconds from ``now`` until ``nbytes`` sent from ``sources`` (split evenly) reach ``targets``;
        reserves the sending ports. 0 when a target is one of the sources (the data stays on it)."""
        if not sources:
            raise InvalidArgument("a transfer needs at least one sending device")
        local = any(t is s for t in targets for s in sources)
        return self._delay(now, [self._port(d) for d in sources], local, nbytes)

    def _delay(self, now: float, ports: Sequence[_Port], local: bool, nbytes: int) -> float:
        """``delay`` from the sending devices' ports and whether a target is one of them."""
        if nbytes < 0:
            raise InvalidArgument(f"nbytes must be >= 0, got {nbytes}")
        if nbytes == 0 or local:
            return 0.0
        share = nbytes / len(ports) / self.bytes_per_s
        end = now
        for port in ports:
            start = max(now, port.free_at)
            port.free_at = start + share
            port.busy_s += share
            end = max(end, port.free_at)
        return end - now + self.latency_s

    def sender(self, sources: Sequence[Device], targets: Sequence[Device]) -> Callable[[float, int], float]:
        """``delay`` for transfers from ``sources`` to ``targets``, as a function of (now, nbytes): their
        ports and whether the data stays on a device found once, not per transfer."""
        if not sources:
            raise InvalidArgument("a transfer needs at least one sending device")
        ports = [self._port(d) for d in sources]
        local = any(t is s for t in targets for s in sources)
        delay = self._delay

        def send(now: float, nbytes: int) -> float:
            return delay(now, ports, local, nbytes)

        return send

    def link(
        self,
        sources: Sequence[Device],
        targets: Sequence[Device],
        overhead_s: float | Callable[[float], float] = 0.0,
    ) -> Callable[[int], float]:
        """A plane's ``link_s`` for transfers from ``sources`` to ``targets`` (on the running loop's clock),
        plus a host ``overhead_s`` per transfer (a constant, or a function of the virtual time: a
        ``asap.sim.hostcost.HostDelay``)."""
        send = self.sender(list(sources), list(targets))
        host = overhead_s if callable(overhead_s) else (lambda _now, fixed=overhead_s: fixed)

        def link_s(nbytes: int) -> float:
            now = asyncio.get_running_loop().time()
            return send(now, nbytes) + host(now)

        return link_s
