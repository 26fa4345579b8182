"""Emulated compute (``--compute emulated:DEVICE``): modelled device time instead of real math.

``profiles`` holds the device figures, ``costs`` the roofline cost model, ``parts`` the stand-ins for the
model's attention and expert parts, ``routing`` their random top-k routing, ``clock`` accurate sleeping,
``cpu_check`` a check that the host CPU is not what limits an emulated run.

The names below are loaded on first use: ``parts`` imports torch, and the benchmark client reads
``profiles`` and ``cpu_check`` without needing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asap.emulation.clock import Sleeper
    from asap.emulation.cpu_check import CpuReport, CpuSnapshot, cpu_report, take_snapshot
    from asap.emulation.parts import EmulatedAttentionPart, EmulatedExpertPart
    from asap.emulation.profiles import PROFILES, DeviceProfile, load_profile, parse_compute
    from asap.emulation.routing import RandomRouter

_HOMES = {
    "Sleeper": "clock",
    "CpuReport": "cpu_check",
    "CpuSnapshot": "cpu_check",
    "cpu_report": "cpu_check",
    "take_snapshot": "cpu_check",
    "EmulatedAttentionPart": "parts",
    "EmulatedExpertPart": "parts",
    "RandomRouter": "routing",
    "PROFILES": "profiles",
    "DeviceProfile": "profiles",
    "load_profile": "profiles",
    "parse_compute": "profiles",
}

__all__ = [
    "PROFILES",
    "CpuReport",
    "CpuSnapshot",
    "DeviceProfile",
    "EmulatedAttentionPart",
    "EmulatedExpertPart",
    "RandomRouter",
    "Sleeper",
    "cpu_report",
    "load_profile",
    "parse_compute",
    "take_snapshot",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"asap.emulation.{home}"), name)
