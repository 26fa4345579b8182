"""Kernels of the roofline cost model (``asap.emulation.costs``): the work and traffic of one device
kernel, its time on a profile, and a call's time as an eager framework issues its kernels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from asap.emulation.profiles import DeviceProfile

KernelKind = Literal["gemm", "attention", "grouped_gemm", "memory"]


@dataclass(frozen=True, slots=True)
class Kernel:
    """One device kernel: work and traffic, and which efficiency factor of the profile applies."""

    flops: float
    """Floating-point operations (a multiply-add counts 2)."""
    nbytes: float
    """Bytes read plus written in device memory."""
    kind: KernelKind


def kernel_s(kernel: Kernel, profile: DeviceProfile) -> float:
    """Device time of one kernel (s): the roofline maximum of compute and memory time."""
    efficiency = {
        "gemm": profile.gemm_efficiency,
        "attention": profile.attention_efficiency,
        "grouped_gemm": profile.grouped_gemm_efficiency,
        "memory": 1.0,
    }[kernel.kind]
    compute = kernel.flops / (profile.peak_tflops * 1e12 * efficiency)
    memory = kernel.nbytes / (profile.hbm_gbps * 1e9 * profile.memory_efficiency)
    return max(compute, memory)


def stream_s(kernels: Iterable[Kernel], profile: DeviceProfile) -> float:
    """Time of one call (s): kernels issued every ``launch_us`` by the host, run in order by the device."""
    launch = profile.launch_us * 1e-6
    host = device = 0.0
    for kernel in kernels:
        host += launch
        device = max(device, host) + kernel_s(kernel, profile)
    return device


def gemm(m: int, n: int, k: int, dtype_bytes: int) -> Kernel:
    """[m, k] @ [k, n]: activations and the weight read once, output written."""
    return Kernel(2.0 * m * n * k, float(m * k + k * n + m * n) * dtype_bytes, "gemm")


def elementwise(read_elems: int, write_elems: int, dtype_bytes: int) -> Kernel:
    """A memory-bound kernel (norm, RoPE, activation, residual add, gather/scatter)."""
    return Kernel(0.0, float(read_elems + write_elems) * dtype_bytes, "memory")
