from __future__ import annotations

import pytest

from asap.emulation.profiles import PROFILES, DeviceProfile, emulated_device, load_profile, parse_compute
from asap.errors import InvalidArgument


def test_known_profiles_carry_datasheet_figures() -> None:
    h200, ascend = load_profile("h200"), load_profile("ascend910")
    assert (h200.peak_tflops, h200.hbm_gbps) == (989.0, 4800.0)
    assert (ascend.peak_tflops, ascend.hbm_gbps) == (256.0, 1200.0)
    assert load_profile(" H200 ") is h200
    assert all(p.source for p in PROFILES.values())


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(InvalidArgument, match=r"'b200'.*ascend910.*h200"):
        load_profile("b200")


@pytest.mark.parametrize(
    ("spec", "kind", "device"),
    [
        ("torch", "torch", None),
        ("emulated:h200", "emulated", "h200"),
        ("emulated:ascend910", "emulated", "ascend910"),
    ],
)
def test_parse_compute(spec: str, kind: str, device: str | None) -> None:
    got_kind, profile = parse_compute(spec)
    assert got_kind == kind
    assert (profile.name if profile else None) == device


@pytest.mark.parametrize("spec", ["", "emulated", "emulated:", "cuda", "emulated:nope", "torch:h200"])
def test_parse_compute_rejects(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_compute(spec)


def test_profile_validates_and_slows() -> None:
    with pytest.raises(InvalidArgument, match="gemm_efficiency"):
        DeviceProfile("x", 1.0, 1.0, 1.0, 1.0, 1.5, 0.5, 0.5, 0.5)
    slow = load_profile("h200").slowed(10)
    assert slow.peak_tflops == pytest.approx(98.9)
    assert slow.launch_us == pytest.approx(load_profile("h200").launch_us * 10)
    with pytest.raises(InvalidArgument):
        load_profile("h200").slowed(0)


@pytest.mark.parametrize(
    ("spec", "device"),
    [("torch", None), ("emulated:h200", ("h200", None)), (" emulated:h200/20 ", ("h200", 20.0))],
)
def test_emulated_device_names_the_device_and_its_dilation(
    spec: str, device: tuple[str, float | None] | None
) -> None:
    assert emulated_device(spec) == device
    dilated = parse_compute(spec)[1]
    assert (dilated.name if dilated else None) == (None if device is None else spec.strip().partition(":")[2])


@pytest.mark.parametrize("spec", ["cuda", "emulated:", "emulated:h200/x"])
def test_emulated_device_rejects(spec: str) -> None:
    with pytest.raises(InvalidArgument):
        emulated_device(spec)
