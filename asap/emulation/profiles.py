"""Device profiles of the emulated compute backend, and parsing of ``--compute``.

A profile holds public datasheet figures (peak dense 16-bit matrix throughput, HBM bandwidth, link
bandwidth) plus the factors that turn them into achievable times: the fraction of peak that GEMMs,
attention and grouped expert GEMMs reach, the fraction of HBM bandwidth that streaming kernels reach, and
the host-side cost of issuing one kernel. ``costs`` turns a profile and a model shape into seconds.

Profiles (``PROFILES``):

``h200``
    NVIDIA H200 SXM. Datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity), 4.8 TB/s HBM3e, NVLink 900
    GB/s per GPU (bidirectional; 450 GB/s each way). ~790 TFLOP/s is what a large bf16 matmul reaches on
    the device tool's H200, hence ``gemm_efficiency`` 0.8. The other factors and ``launch_us`` are fitted
    to ``tests/data/h200_qwen3_30b_a3b_layer.json`` (one Qwen3-30B-A3B layer measured on an H200, torch
    eager); ``tests/emulation/test_calibration.py`` holds every point within 20%.
``ascend910``
    Huawei Ascend 910 (the first-generation "910A", 2019). Huawei launch figures: 256 TFLOP/s FP16 (512
    TOPS INT8, 32 Da Vinci cores, 310 W); four HBM2 stacks, 1.2 TB/s (Hot Chips 31, 2019); HCCS 30 GB/s
    per chip-to-chip link (240 Gbit/s as quoted by Huawei) inside an 8-chip server, 100 Gbit/s RoCE
    between servers. Efficiency factors and launch cost are NOT calibrated on the device: they reuse the
    ``h200`` fit, so relative speed follows the datasheet ratios only.
``ascend910b``
    Huawei Ascend 910B. Huawei publishes no full datasheet; third-party reports vary by bin (about 280-376
    TFLOP/s FP16; 64 GB HBM2e at ~1.6 TB/s; HCCS 56 GB/s per link, 392 GB/s over 7 links). Values below
    are 320 TFLOP/s, 1.6 TB/s and 56 GB/s; efficiencies reuse the ``h200`` fit. Treat as approximate.

Ports (``port_gbps``, ``link_latency_us``; used by ``asap simulate --links ports`` only). ``link_gbps`` is
one device-to-device transfer; in an all-to-all over several servers (the MoE dispatch and combine of 32
devices, 8 per server) a device's transfers to every peer share its network port, so a rank's dispatch
takes its *total* bytes over the port, not its largest single transfer over ``link_gbps``:

``h200``: one 400 Gbit/s InfiniBand NDR adapter (ConnectX-7) per GPU, 50 GB/s each way, as in NVIDIA
    DGX H100/H200 systems; DeepEP's normal (prefill) kernels reach 43-58 GB/s per GPU over such RDMA
    between nodes (github.com/deepseek-ai/DeepEP, README, later docs/legacy.md: 43 / 58 / 51 GB/s at EP 16 / 32 / 64, H800 + CX7 400 Gb/s). Inside one 8-GPU node
    NVLink is faster (``link_gbps``); the port figure is for clusters beyond one node.
``ascend910``: one 100 GE RoCE port per chip for communication between servers (Huawei: "the 100G ETH
    ports provided by each training card are used for communication between servers", Atlas 300T training
    card model 9000 documentation, support.huawei.com EDOC1100164821; the Atlas 900 cluster description:
    "HCCS, PCIe 4.0, 100G Ethernet"), 12.5 GB/s each way. At 32 devices 24 of a device's 31 peers are on
    other servers; the rest of its traffic (HCCS inside a 4-chip group, PCIe or RoCE across groups) is
    charged at the same port, which overstates it by at most ~25%.
``ascend910b``: 200 GE RoCE per chip (Atlas 800T A2, approximate), 25 GB/s.
``link_latency_us`` 2 us: RDMA over a switch, the order of magnitude Huawei quotes for RoCE between
    nodes (2 us, against 0.2 us for its A3 SuperPoD bus); small beside the transfers of a prefill batch.

Units: TFLOP/s = 1e12 FLOP/s, GB/s = 1e9 B/s, microseconds for ``launch_us``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from asap.errors import InvalidArgument

COLLECTIVE_STEP_US = 3.4
"""Per-step latency of a ring collective, microseconds: NCCL's cost model for a ring all-reduce with its
bulk ("Simple") protocol over NVLink (``src/graph/tuning.cc``, ``hwLat[NVLINK][RING][SIMPLE]`` = 3.4; the
base latency of 8.4 us per collective is below the one kernel launch ``launch_us`` charges). Used for every
profile: no HCCL figure is published for HCCS; at prefill sizes the transfer dominates (a 2,048-token
DS-V3 all-reduce over 4 devices: 1.5 ms of transfer at 30 GB/s against 20 us of step latency)."""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Peak figures of one accelerator and the achievable fractions of them."""

    name: str
    peak_tflops: float
    """Dense 16-bit (bf16/fp16) matrix throughput, TFLOP/s, from the datasheet."""
    hbm_gbps: float
    """Device memory bandwidth, GB/s, from the datasheet."""
    link_gbps: float
    """Device-to-device bandwidth of one transfer, GB/s in one direction."""
    launch_us: float
    """Host cost of issuing one kernel, microseconds (framework dispatch plus driver launch)."""
    gemm_efficiency: float
    """Fraction of ``peak_tflops`` a large dense GEMM reaches."""
    attention_efficiency: float
    """Fraction of ``peak_tflops`` causal flash attention reaches on long prompts."""
    grouped_gemm_efficiency: float
    """Fraction of ``peak_tflops`` the routed experts' grouped GEMMs reach when compute-bound."""
    memory_efficiency: float
    """Fraction of ``hbm_gbps`` streaming kernels (weight reads, elementwise ops) reach."""
    source: str = ""
    """Where the figures come from."""
    port_gbps: float | None = None
    """A device's own network port, GB/s in one direction: what all of its transfers to and from other
    devices share in an all-to-all across servers (``asap simulate --links ports``). ``None``: no port
    model (every transfer at ``link_gbps``, independently, as ``--links pair`` and the emulated cluster
    charge them)."""
    link_latency_us: float = 0.0
    """Latency of one transfer over the port, microseconds, added once per transfer (``--links ports``)."""
    collective_step_us: float = COLLECTIVE_STEP_US
    """Latency of one step of a ring collective over ``link_gbps`` (the attention ranks' tensor-parallel
    all-reduce, ``costs.all_reduce_s``), microseconds; see ``COLLECTIVE_STEP_US``."""

    def __post_init__(self) -> None:
        for field in ("peak_tflops", "hbm_gbps", "link_gbps"):
            if getattr(self, field) <= 0:
                raise InvalidArgument(f"profile {self.name}: {field} must be positive")
        if self.port_gbps is not None and self.port_gbps <= 0:
            raise InvalidArgument(f"profile {self.name}: port_gbps must be positive")
        if self.link_latency_us < 0:
            raise InvalidArgument(f"profile {self.name}: link_latency_us must be >= 0")
        if self.collective_step_us < 0:
            raise InvalidArgument(f"profile {self.name}: collective_step_us must be >= 0")
        if self.launch_us < 0:
            raise InvalidArgument(f"profile {self.name}: launch_us must be >= 0, got {self.launch_us}")
        for field in (
            "gemm_efficiency",
            "attention_efficiency",
            "grouped_gemm_efficiency",
            "memory_efficiency",
        ):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise InvalidArgument(f"profile {self.name}: {field} must be in (0, 1], got {value}")

    def slowed(self, factor: float) -> DeviceProfile:
        """The same device ``factor`` times slower in every respect (rates divided, launch cost multiplied)."""
        if factor <= 0:
            raise InvalidArgument(f"slow-down factor must be positive, got {factor}")
        return replace(
            self,
            name=f"{self.name}/{factor:g}",
            peak_tflops=self.peak_tflops / factor,
            hbm_gbps=self.hbm_gbps / factor,
            link_gbps=self.link_gbps / factor,
            launch_us=self.launch_us * factor,
            port_gbps=None if self.port_gbps is None else self.port_gbps / factor,
            link_latency_us=self.link_latency_us * factor,
            collective_step_us=self.collective_step_us * factor,
        )


def _with_h200_fit(
    name: str,
    peak_tflops: float,
    hbm_gbps: float,
    link_gbps: float,
    source: str,
    *,
    port_gbps: float | None = None,
    link_latency_us: float = 0.0,
) -> DeviceProfile:
    """A profile from datasheet figures and the efficiencies fitted on the H200 calibration file (see the
    module docstring): measured for ``h200``, reused uncalibrated for Ascend, so that relative speed
    follows the datasheet ratios."""
    return DeviceProfile(
        name=name,
        peak_tflops=peak_tflops,
        hbm_gbps=hbm_gbps,
        link_gbps=link_gbps,
        launch_us=40.0,
        gemm_efficiency=0.8,
        attention_efficiency=0.55,
        grouped_gemm_efficiency=0.55,
        memory_efficiency=0.65,
        source=source,
        port_gbps=port_gbps,
        link_latency_us=link_latency_us,
    )


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _with_h200_fit(
            "h200",
            peak_tflops=989.0,
            hbm_gbps=4800.0,
            link_gbps=450.0,
            source="NVIDIA H200 SXM datasheet; efficiencies fitted to a measured Qwen3-30B-A3B layer",
            port_gbps=50.0,
            link_latency_us=2.0,
        ),
        _with_h200_fit(
            "ascend910",
            peak_tflops=256.0,
            hbm_gbps=1200.0,
            link_gbps=30.0,
            source="Huawei Ascend 910 (910A) launch figures and Hot Chips 31; efficiencies not calibrated",
            port_gbps=12.5,
            link_latency_us=2.0,
        ),
        _with_h200_fit(
            "ascend910b",
            peak_tflops=320.0,
            hbm_gbps=1600.0,
            link_gbps=56.0,
            source="Ascend 910B third-party reported figures (approximate); efficiencies not calibrated",
            port_gbps=25.0,
            link_latency_us=2.0,
        ),
    )
}


def load_profile(name: str) -> DeviceProfile:
    """The profile called ``name`` (case-insensitive); ``InvalidArgument`` lists the known names."""
    profile = PROFILES.get(name.strip().lower())
    if profile is None:
        raise InvalidArgument(f"unknown device profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return profile


def parse_compute(spec: str) -> tuple[str, DeviceProfile | None]:
    """Parse a ``--compute`` value: ``torch`` -> ("torch", None); ``emulated:DEVICE`` -> ("emulated", profile).

    ``emulated:DEVICE/F`` dilates time by F: the device runs F times slower in every respect. Used when the
    host's CPU cannot keep up with the real device's pace (many ranks on few cores): every modeled time,
    hence every latency, is F times longer and every rate F times lower than on the real device.
    """
    device = emulated_device(spec)
    if device is None:
        return "torch", None
    name, dilation = device
    profile = load_profile(name)
    return "emulated", profile if dilation is None else profile.slowed(dilation)


def emulated_device(spec: str) -> tuple[str, float | None] | None:
    """The device name and time dilation of ``emulated:DEVICE[/F]`` (F None when absent); None for
    ``torch``. ``InvalidArgument`` for any other value or a dilation that is not a number; the device
    name is not looked up here (``parse_compute`` does)."""
    text = spec.strip()
    if text == "torch":
        return None
    kind, sep, device = text.partition(":")
    if kind == "emulated" and sep and device:
        name, slash, factor = device.partition("/")
        if not slash:
            return name, None
        try:
            return name, float(factor)
        except ValueError:
            raise InvalidArgument(
                f"bad --compute value {spec!r}: time dilation {factor!r} is not a number"
            ) from None
    raise InvalidArgument(
        f"bad --compute value {spec!r}: expected 'torch' or 'emulated:DEVICE' "
        f"(devices: {', '.join(sorted(PROFILES))})"
    )
