"""A whole ASAP cluster in one process, on the virtual clock: the services' own cores and handlers.

``SimCluster.start`` builds what ``asap up`` would start for a ``ClusterSpec``, from the very service
configurations its processes would parse (the same ``asap serve`` argv through the same parser), and
wires them as the services' ``start`` methods do, with three substitutions:

- compute: each rank's compute thread is a ``DeviceQueue`` on virtual devices and its emulated part
  charges a ``ChargeSleeper`` (``asap.sim.devices``);
- transport: the scheduler's ``AttentionClient`` opens its streams straight into the in-process
  attention servicers; each attention rank's links hand their dispatches to the expert ranks' exchange
  sessions directly, or (``transport="stream"``) over the expert servicers' streams (``asap.sim.transport``);
- devices: ``Layout`` says which devices each rank occupies (disaggregated: its own; colocated: the
  expert ranks share the attention ranks' devices; ``attention_tp``: an attention rank spans N devices
  and its layers are modelled with tensor parallelism, ``asap.emulation.parallel``).

Scheduling, batching, placement, min-batch, sync steps, chunk caches, expert queues, merging, dual-batch,
the expert-overlap lock and the sync barrier are the services' code, unchanged. Warm-up of CUDA kernels
and cold-start effects do not exist here; the scheduler still calibrates its cost model on rank 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asap.clusterspec import ClusterSpec, attention_commands, expert_commands, scheduler_command
from asap.emulation.costs import transfer_s
from asap.emulation.loading import PartSource
from asap.emulation.parallel import TensorParallelAttentionPart
from asap.emulation.profiles import DeviceProfile
from asap.errors import InvalidArgument
from asap.optimizations import parse_optimizations
from asap.sim.breakdown import BatchTap
from asap.sim.devices import ChargeSleeper, Device, DeviceQueue, Inline
from asap.sim.direct import DirectExpertTransport
from asap.sim.hostcost import HostCores, HostCostBarrier, HostDelay
from asap.sim.links import LINK_MODELS, Ports
from asap.sim.transport import InProcessExpertTransport, servicer_opener
from asap.v1 import expert_pb2

logger = logging.getLogger(__name__)

LAYOUTS = ("disaggregated", "colocated")
TRANSPORTS = ("direct", "stream")


@dataclass(frozen=True, slots=True)
class Layout:
    """Which simulated devices the ranks occupy."""

    kind: str = "disaggregated"
    """``disaggregated``: every attention and expert rank on devices of its own; ``colocated``: the
    expert ranks on the attention ranks' devices (DP+EP as vLLM and SGLang run it)."""
    attention_tp: int = 1
    """Devices one attention rank spans (tensor parallelism of attention)."""
    links: str = "pair"
    """How transfers are charged (``asap.sim.links``): ``pair`` (each at ``link_gbps`` on its own, as the
    emulated cluster does) or ``ports`` (a device's transfers share its network port, ``port_gbps``)."""

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise InvalidArgument(f"layout must be one of {', '.join(LAYOUTS)}, got {self.kind!r}")
        if self.links not in LINK_MODELS:
            raise InvalidArgument(f"links must be one of {', '.join(LINK_MODELS)}, got {self.links!r}")
        if self.attention_tp < 1:
            raise InvalidArgument(f"attention tensor parallelism must be >= 1, got {self.attention_tp}")

    def devices(self, attention: int, experts: int) -> tuple[list[list[Device]], list[list[Device]]]:
        """The devices of each attention rank and of each expert rank."""
        tp = self.attention_tp
        shared = [Device(f"device-{i}") for i in range(attention * tp)]
        attention_devices = [shared[r * tp : (r + 1) * tp] for r in range(attention)]
        if self.kind == "disaggregated":
            own = [Device(f"device-{len(shared) + e}") for e in range(experts)]
            return attention_devices, [[device] for device in own]
        # Colocated: spread the expert ranks evenly over the devices (several per device if more ranks).
        count = len(shared)
        index = [e % count if experts >= count else e * count // experts for e in range(experts)]
        return attention_devices, [[shared[i]] for i in index]

    def device_count(self, attention: int, experts: int) -> int:
        return attention * self.attention_tp + (experts if self.kind == "disaggregated" else 0)

    def describe(self, attention: int, experts: int) -> dict[str, Any]:
        return {
            "layout": self.kind,
            "attention_tp": self.attention_tp,
            "links": self.links,
            "devices": self.device_count(attention, experts),
        }


def service_args(argv: Sequence[str]) -> argparse.Namespace:
    """``asap serve ...`` argv parsed by that command's own parser."""
    from asap.commands import serve

    parser = argparse.ArgumentParser(prog="asap")
    serve.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@dataclass(slots=True)
class SimCluster:
    """The services of one ``ClusterSpec`` in this process (``await start()``, ``await stop()``)."""

    spec: ClusterSpec
    layout: Layout = field(default_factory=Layout)
    dispatch_overhead_s: float = 0.0
    """Host cost charged on every dispatch's link on top of its transfer time (RPC, Python, thread
    hand-offs of a real process; 0 = devices and links only). A calibration knob, see ``--help``."""
    barrier_overhead_s: float = 0.0
    """Sync modes: host cost charged at every barrier release (``asap.sim.hostcost``; 0 = none)."""
    host_cores: int = 0
    """Host CPU cores the ranks' host paths share (``asap.sim.hostcost.HostCores``; 0 = a host per rank)."""
    host_cpu_s: float = 0.0
    """With ``host_cores``: the CPU-work part of each rank's per-layer host delay."""
    cores: HostCores | None = None
    """The shared host cores (set by ``start`` when ``host_cores`` > 0)."""
    host_jitter_s: float = 0.0
    """Standard deviation of the per-layer host delay whose mean is ``dispatch_overhead_s``: one draw per
    attention rank and layer (``asap.sim.hostcost.HostDelay``; 0 = the mean every time)."""
    transport: str = "direct"
    """How attention ranks reach the expert ranks: ``direct`` (``asap.sim.direct.DirectPlane``: the
    expert sessions' own handling, no messages) or ``stream`` (the servicers' ``Exchange`` streams with
    the ``grpc`` plane's shape-only chunks, as a real link carries them)."""
    sync_planner: str = "lpt"
    """Sync modes' step planner (``SchedulerConfig.sync_planner``): ``lpt`` or ``per-rank``."""
    port_gbps: float | None = None
    """``links="ports"``: every device's port bandwidth instead of the profile's (a what-if knob)."""
    ports: Ports | None = None
    """The devices' ports with ``Layout.links == "ports"`` (set by ``start``)."""
    attention_devices: list[list[Device]] = field(default_factory=list)
    expert_devices: list[list[Device]] = field(default_factory=list)
    queues: dict[str, list[DeviceQueue]] = field(default_factory=lambda: {"attention": [], "experts": []})
    """Each role's compute queues (its ranks'), for the devices' busy time by role (``role_load``)."""
    cost_model: Any = None
    """The scheduler's calibrated ``AttentionCostModel``: set after ``start``; given before it, the
    scheduler takes it instead of calibrating (``asap.sim.run`` reuses a mode's calibration for its
    tuned variants: the probes go straight to rank 0, past the flags being tuned, so on the virtual
    clock they measure the same)."""
    core: Any = None
    """The ``SchedulerCore``."""
    model_config: Any = None
    model: str = ""
    profile: DeviceProfile | None = None
    tap: BatchTap = field(default_factory=BatchTap)
    """Every ``BatchResult`` the scheduler received, by request (``asap.sim.breakdown``)."""
    _closers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        """Build and start every service (experts, attention ranks, scheduler: the data-flow order); on
        failure what was started is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        from asap.commands.serve import attention_config, expert_config, scheduler_config
        from asap.model.resolve import model_argument
        from attention_svc.core import AttentionExecutor
        from attention_svc.server import AttentionServicer, placement_from_infos
        from expert_svc.build import build_executor
        from expert_svc.exchange import ExpertExchange
        from expert_svc.server import ExpertServicer
        from scheduler_svc.attention_client import AttentionClient
        from scheduler_svc.calibration import calibrate_cost_model
        from scheduler_svc.core import SchedulerCore

        spec = self.spec
        model_dir = model_argument(spec.model)
        self.model = spec.model
        if "min-batch" in parse_optimizations(spec.optimizations) and spec.min_batch_tokens is None:
            from asap.cluster import calibrated_knee

            spec.min_batch_tokens = calibrated_knee(spec, model_dir)
        expert_targets = [f"sim-expert-{e}:0" for e in range(spec.experts)]
        attention_targets = [f"sim-attention-{r}:0" for r in range(spec.attention)]
        self.attention_devices, self.expert_devices = self.layout.devices(spec.attention, spec.experts)

        if self.transport not in TRANSPORTS:
            raise InvalidArgument(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        expert_servicers: list[ExpertServicer] = []
        exchanges: list[ExpertExchange] = []
        for command in expert_commands(spec, model_dir):
            config = expert_config(service_args(command.argv))
            sleeper = ChargeSleeper()
            queue = DeviceQueue(self.expert_devices[config.rank], sleeper)
            self.queues["experts"].append(queue)
            executor = build_executor(config, sleeper=sleeper, compute=queue)
            if not getattr(executor.part, "emulated", False):
                raise InvalidArgument("asap simulate needs --compute emulated:DEVICE")
            await executor.start()
            self._closers.append(executor.stop)
            source = PartSource.of(config.model, config.dtype, config.compute)
            exchange = ExpertExchange(
                executor,
                Inline(),
                barrier=HostCostBarrier(self.barrier_overhead_s),
                overlap="expert-overlap" in config.optimizations,
                profile=source.profile,
                result_link_s=self._result_link(source.profile, config.rank),
            )
            exchange.barrier.timeout_s = config.sync_timeout_s
            exchange.barrier.supersede = True  # as the expert service sets it: one step at a time
            exchanges.append(exchange)
            expert_servicers.append(ExpertServicer(exchange, config.rank, config.device))

        attention_servicers: list[AttentionServicer] = []
        for command in attention_commands(spec, model_dir, expert_targets):
            config = attention_config(service_args(command.argv))
            source = PartSource.of(config.model, config.dtype, config.compute)
            profile = source.profile
            if profile is None:
                raise InvalidArgument("asap simulate needs --compute emulated:DEVICE")
            self.model_config, self.profile = source.config, profile
            sleeper = ChargeSleeper()
            part = TensorParallelAttentionPart(
                source.config,
                profile,
                seed=config.rank,
                skew=config.route_skew,
                dtype=source.dtype,
                sleeper=sleeper,
                tensor_parallel=self.layout.attention_tp,
            )
            transport: InProcessExpertTransport | DirectExpertTransport
            if self.host_cores > 0 and self.cores is None:
                self.cores = HostCores(self.host_cores)
            host = HostDelay(
                self.dispatch_overhead_s, self.host_jitter_s, config.rank, self.cores, self.host_cpu_s
            )
            link = {
                "attention_rank": config.rank,
                "hidden_size": source.config.hidden_size,
                "dtype": source.dtype,
                "max_chunk_bytes": config.max_chunk_bytes,
                "link_s": _link(profile, host),
            }
            if self.transport == "direct":
                transport = DirectExpertTransport(exchanges, **link)
            else:
                transport = InProcessExpertTransport(expert_servicers, **link)
            planes: Sequence[Any] = transport.planes
            if self.dispatch_overhead_s > 0 and self.transport == "direct":
                for plane in planes:  # an idle rank's empty dispatches pay the host path too
                    plane.charge_empty = True
            if self.ports is not None:  # each link's transfers on its devices' ports
                for e, plane in enumerate(planes):
                    plane.spec = dataclasses.replace(
                        plane.spec,
                        link_s=self.ports.link(
                            self.attention_devices[config.rank],
                            self.expert_devices[e],
                            host,
                        ),
                    )
            self._closers.append(transport.close)
            infos = [await s.Info(expert_pb2.ExpertInfoRequest(), None) for s in expert_servicers]  # type: ignore[arg-type]
            compute = DeviceQueue(self.attention_devices[config.rank], sleeper)
            self.queues["attention"].append(compute)
            attention = AttentionExecutor(
                part,
                transport,
                placement_from_infos(source.config, infos),
                max_inflight=config.max_inflight_batches,
                compute=compute,
            )
            await attention.run_batch([attention.make_prompt("warm-up", [0, 1, 2, 3])])
            attention_servicers.append(AttentionServicer(attention, config))

        service = scheduler_config(service_args(scheduler_command(spec, model_dir, attention_targets).argv))
        service.core = dataclasses.replace(service.core, sync_planner=self.sync_planner)  # validated
        client = AttentionClient(
            attention_targets,
            mode=service.core.mode,
            open_calls=[self.tap.wrap(servicer_opener(s.Run)) for s in attention_servicers],  # type: ignore[arg-type]
        )
        self._closers.append(client.close)
        core = SchedulerCore(service.core, spec.attention, client)
        if service.calibrate:
            if self.cost_model is None:
                self.cost_model = await calibrate_cost_model(
                    client, self.model_config, on_rank_down=core.mark_rank_down
                )
            core.set_cost_model(self.cost_model)
        await core.start()
        self.core = core

    async def stop(self) -> None:
        """Stop the scheduler core, then the links and executors (reverse order of start)."""
        if self.core is not None:
            await self.core.stop()
            self.core = None
        while self._closers:
            await self._closers.pop()()

    def _result_link(self, profile: DeviceProfile | None, expert_rank: int) -> Any:
        """``links="ports"``: the expert rank's results leave on its device's port (``asap.sim.links``)."""
        if self.layout.links != "ports" or profile is None:
            return None
        if self.ports is None:
            given = self.port_gbps
            self.ports = Ports(profile if given is None else dataclasses.replace(profile, port_gbps=given))
        ports, sources = self.ports, self.expert_devices[expert_rank]
        senders = [ports.sender(sources, targets) for targets in self.attention_devices]

        def result_link_s(nbytes: int, attention_rank: int) -> float:
            return senders[attention_rank](asyncio.get_running_loop().time(), nbytes)

        return result_link_s

    def devices(self, role: str | None = None) -> list[Device]:
        """Every device, each once; with ``role`` (``attention`` or ``experts``), that role's."""
        groups = {"attention": self.attention_devices, "experts": self.expert_devices}
        chosen = [groups[role]] if role is not None else list(groups.values())
        seen: dict[int, Device] = {}
        for group in (g for role_groups in chosen for g in role_groups):
            for device in group:
                seen.setdefault(id(device), device)
        return list(seen.values())

    def busy_marks(self) -> dict[str, list[float]]:
        """Every role's queues' ``busy_s`` now: the start of a span for ``role_load``."""
        return {role: [queue.busy_s for queue in queues] for role, queues in self.queues.items()}

    def role_load(
        self, marks: dict[str, list[float]], span_s: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Since ``marks`` (``busy_marks``), over ``span_s`` virtual seconds, per role (``attention``,
        ``experts``): the fraction of the role's devices' time its work held them, and the busiest rank's
        fraction of its own devices' time. Where the roles share devices (colocated), each role's figure
        is its part of those devices' time."""
        mean: dict[str, float] = {}
        busiest: dict[str, float] = {}
        for role, queues in self.queues.items():
            if not queues or span_s <= 0:
                continue
            spent = [queue.busy_s - mark for queue, mark in zip(queues, marks[role], strict=True)]
            mean[role] = sum(spent) / (len(self.devices(role)) * span_s)
            busiest[role] = max(s / (len(q.devices) * span_s) for s, q in zip(spent, queues, strict=True))
        return mean, busiest


def _link(profile: DeviceProfile, host: HostDelay) -> Any:
    if host.constant:
        overhead_s = host.mean_s

        def link_s(nbytes: int) -> float:
            return transfer_s(nbytes, profile) + overhead_s

        return link_s

    def jittered_link_s(nbytes: int) -> float:
        return transfer_s(nbytes, profile) + host(asyncio.get_running_loop().time())

    return jittered_link_s
