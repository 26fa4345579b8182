"""Emulated compute (``--compute emulated:DEVICE``): modelled device time instead of real math.

``profiles`` holds the device figures, ``costs`` the roofline cost model, ``parts`` the stand-ins for the
model's attention and expert parts, ``clock`` accurate sleeping, ``cpu_check`` a check that the host CPU
is not what limits an emulated run.
"""

from asap.emulation.clock import Sleeper
from asap.emulation.cpu_check import CpuReport, CpuSnapshot, cpu_report, take_snapshot
from asap.emulation.parts import EmulatedAttentionPart, EmulatedExpertPart, RandomRouter
from asap.emulation.profiles import PROFILES, DeviceProfile, load_profile, parse_compute

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
