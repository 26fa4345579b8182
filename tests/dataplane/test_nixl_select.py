"""Which links use the NIXL plane and why: ``auto`` only for remote expert ranks that accept NIXL links,
with the reason when not; a forced ``nixl`` fails with ``InvalidArgument`` naming why; ``asap up`` passes
``--data-plane`` to every rank."""

from __future__ import annotations

import pytest

from asap.clusterspec import ClusterSpec, attention_commands, expert_commands
from asap.dataplane import nixl_select
from asap.dataplane.nixl_select import confirm_nixl, expert_accepts_nixl, nixl_candidate
from asap.dataplane.select import expert_planes, fast_possible, select_data_plane
from asap.errors import InvalidArgument
from asap.v1 import expert_pb2

REMOTE = "10.1.2.3:50071"


@pytest.fixture(params=["installed", "missing"])
def nixl_here(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    missing = "" if request.param == "installed" else "NIXL is not installed (pip install asap-serve[nixl])"
    monkeypatch.setattr(nixl_select, "nixl_missing", lambda: missing)
    monkeypatch.setattr(nixl_select, "nixl_installed", lambda: not missing)
    return not missing


def test_auto_tries_nixl_only_for_remote_targets(nixl_here: bool) -> None:
    use, why = nixl_candidate("auto", REMOTE, emulated=False)
    assert use == nixl_here and (why == "" if nixl_here else "not installed" in why)
    use, why = nixl_candidate("auto", "127.0.0.1:50071", emulated=False)
    assert not use and "on this host" in why
    use, why = nixl_candidate("auto", REMOTE, emulated=True)
    assert not use and "emulated" in why
    assert nixl_candidate("grpc", REMOTE, emulated=False) == (False, "--data-plane grpc")


def test_forced_nixl_says_why_it_is_not_possible(nixl_here: bool) -> None:
    if nixl_here:
        assert nixl_candidate("nixl", "127.0.0.1:1", emulated=False) == (True, "")
    else:
        with pytest.raises(InvalidArgument, match="not installed"):
            nixl_candidate("nixl", REMOTE, emulated=False)
    with pytest.raises(InvalidArgument, match="emulated"):
        nixl_candidate("nixl", REMOTE, emulated=True)


def test_the_expert_rank_settles_it() -> None:
    accepts = expert_pb2.ExpertInfo(nixl_data_plane=True)
    refuses = expert_pb2.ExpertInfo()
    assert confirm_nixl("auto", accepts) == (True, "")
    use, why = confirm_nixl("auto", refuses, where="0 at h:1")
    assert not use and "does not accept NIXL" in why
    with pytest.raises(InvalidArgument, match="does not accept NIXL"):
        confirm_nixl("nixl", refuses)


def test_expert_acceptance(nixl_here: bool) -> None:
    assert expert_accepts_nixl("auto", emulated=False) == nixl_here
    assert not expert_accepts_nixl("auto", emulated=True)
    assert not expert_accepts_nixl("grpc", emulated=False)
    assert not expert_accepts_nixl("shm", emulated=False)
    if not nixl_here:
        with pytest.raises(InvalidArgument, match="not installed"):
            expert_accepts_nixl("nixl", emulated=False)


def test_nixl_runs_over_grpc_bytes_and_no_same_host_plane() -> None:
    assert select_data_plane("nixl", "127.0.0.1:1", "cpu") == "grpc"
    assert expert_planes("nixl", "cpu", emulated=False) == (False, False)
    assert not fast_possible("nixl", "127.0.0.1:1", "cpu")


def test_up_passes_the_data_plane_to_every_rank() -> None:
    assert all("--data-plane" not in c.argv for c in expert_commands(ClusterSpec(), "m"))
    spec = ClusterSpec(data_plane="nixl")
    commands = [*expert_commands(spec, "m"), *attention_commands(spec, "m", ["h:1", "h:2"])]
    for command in commands:
        i = command.argv.index("--data-plane")
        assert command.argv[i + 1] == "nixl"
    with pytest.raises(InvalidArgument, match="data_plane must be one of"):
        ClusterSpec(data_plane="rdma")
