"""Network ports of simulated devices (``asap.sim.links``): an all-to-all's transfers share a port."""

from __future__ import annotations

import dataclasses

import pytest

from asap.emulation.profiles import PROFILES, load_profile
from asap.errors import InvalidArgument
from asap.sim.cluster import Layout
from asap.sim.devices import Device
from asap.sim.links import Ports

PROFILE = dataclasses.replace(load_profile("ascend910"), port_gbps=10.0, link_latency_us=5.0)
GB = 10**9


def test_transfers_from_one_device_queue_on_its_port() -> None:
    ports = Ports(PROFILE)
    a, b, c = Device("a"), Device("b"), Device("c")
    first = ports.delay(0.0, [a], [b], GB)  # 1 GB at 10 GB/s
    second = ports.delay(0.0, [a], [c], GB)  # sent at the same moment: waits for the first
    assert first == pytest.approx(0.1 + 5e-6) and second == pytest.approx(0.2 + 5e-6)
    assert ports.delay(0.0, [b], [a], GB) == pytest.approx(0.1 + 5e-6)  # another device's port is free
    assert ports.delay(0.5, [a], [b], GB) == pytest.approx(0.1 + 5e-6)  # the port is idle again by then


def test_a_group_sends_from_all_its_devices_and_local_data_is_free() -> None:
    ports = Ports(PROFILE)
    group = [Device(f"d{i}") for i in range(4)]
    other = Device("x")
    assert ports.delay(0.0, group, [other], 4 * GB) == pytest.approx(0.1 + 5e-6)  # 1 GB from each
    assert ports.delay(0.0, group, [group[2]], 4 * GB) == 0.0  # an expert rank on the group's own device
    assert ports.delay(0.0, [other], group, 0) == 0.0


def test_a_sender_charges_what_delay_charges() -> None:
    """``Ports.sender`` (ports and locality found once) reserves and returns what ``delay`` does."""
    group, other = [Device(f"d{i}") for i in range(2)], Device("x")
    by_delay, by_sender = Ports(PROFILE), Ports(PROFILE)
    send, local = by_sender.sender(group, [other]), by_sender.sender(group, [group[1]])
    for now, nbytes in [(0.0, GB), (0.0, 3 * GB), (0.05, GB // 2), (1.0, 0), (1.0, 7)]:
        assert send(now, nbytes) == by_delay.delay(now, group, [other], nbytes)
        assert local(now, nbytes) == by_delay.delay(now, group, [group[1]], nbytes) == 0.0
    with pytest.raises(InvalidArgument):
        by_sender.sender([], [other])
    with pytest.raises(InvalidArgument):
        send(0.0, -1)


def test_ports_need_a_port_figure_and_valid_sizes() -> None:
    with pytest.raises(InvalidArgument):
        Ports(dataclasses.replace(PROFILE, port_gbps=None))
    with pytest.raises(InvalidArgument):
        Ports(PROFILE).delay(0.0, [Device("a")], [Device("b")], -1)
    with pytest.raises(InvalidArgument):
        Layout(links="wires")


def test_every_profile_has_a_port_slower_than_its_dilated_self() -> None:
    for profile in PROFILES.values():
        assert profile.port_gbps is not None and 0 < profile.port_gbps <= profile.link_gbps
        slowed = profile.slowed(50)
        assert slowed.port_gbps == pytest.approx(profile.port_gbps / 50)
        assert slowed.link_latency_us == pytest.approx(profile.link_latency_us * 50)


COLOCATED_32 = ["--compute", "emulated:h200", "--layout", "colocated", "--attention", "8", "--experts", "32"]
COLOCATED_32 += ["--attention-tp", "4"]


@pytest.mark.parametrize(
    ("argv", "links"),
    [
        # the paper's two 32-device systems on a real device profile: across servers, ports
        (
            ["--compute", "emulated:ascend910", "--attention", "4", "--attention-tp", "4", "--experts", "16"],
            "ports",
        ),
        (
            COLOCATED_32,
            "ports",
        ),
        # the emulated cluster's validation setting (time-dilated), and one server: pair
        (["--compute", "emulated:h200/50", "--attention", "8", "--experts", "4"], "pair"),
        (["--compute", "emulated:h200", "--attention", "4", "--experts", "4"], "pair"),
        (
            ["--compute", "emulated:ascend910", "--attention", "4", "--experts", "16", "--links", "pair"],
            "pair",
        ),
        (["--compute", "emulated:h200", "--links", "ports"], "ports"),
    ],
)
def test_links_auto_is_ports_beyond_one_server_on_a_real_profile(argv: list[str], links: str) -> None:
    import argparse

    from asap.commands import simulate

    parser = argparse.ArgumentParser()
    simulate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", *argv])
    assert simulate.resolve_links(args) == links
