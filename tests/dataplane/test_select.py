"""Data-plane selection: the attention rank's candidate, the expert rank's answer, forced planes."""

from __future__ import annotations

import socket

import pytest
import torch

from asap.dataplane.select import confirm_data_plane, expert_planes, is_local_target, select_data_plane
from asap.errors import InvalidArgument
from asap.v1 import expert_pb2


def test_local_targets() -> None:
    assert is_local_target("127.0.0.1:5000") and is_local_target("localhost:1") and is_local_target("[::1]:5")
    assert is_local_target(f"{socket.gethostname()}:7") and is_local_target("unix:/tmp/x.sock")
    assert not is_local_target("10.1.2.3:5000") and not is_local_target("expert-7.example:5000")


def test_candidate_plane() -> None:
    assert select_data_plane("auto", "127.0.0.1:1", "cpu") == "shm"
    assert select_data_plane("auto", "10.1.2.3:1", "cpu") == "grpc"
    assert select_data_plane("auto", "127.0.0.1:1", "cpu", emulated=True) == "grpc"
    assert select_data_plane("grpc", "127.0.0.1:1", "cpu") == "grpc"
    assert select_data_plane("grpc", "127.0.0.1:1", "cuda:0") == "grpc"
    assert select_data_plane("shm", "localhost:1", "cpu") == "shm"
    with pytest.raises(InvalidArgument, match="not on this host"):
        select_data_plane("shm", "10.1.2.3:1", "cpu")
    with pytest.raises(InvalidArgument, match="is not cpu"):
        select_data_plane("shm", "127.0.0.1:1", "cuda")
    with pytest.raises(InvalidArgument, match="is not cuda"):
        select_data_plane("cuda-ipc", "127.0.0.1:1", "cpu")
    with pytest.raises(InvalidArgument, match="must be one of"):
        select_data_plane("rdma", "127.0.0.1:1", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_ranks_without_cuda_fall_back_or_fail() -> None:
    assert select_data_plane("auto", "127.0.0.1:1", "cuda:0") == "grpc"
    with pytest.raises(InvalidArgument, match="no CUDA"):
        select_data_plane("cuda-ipc", "127.0.0.1:1", "cuda:0")
    with pytest.raises(InvalidArgument, match="cuda-ipc is not possible"):
        expert_planes("cuda-ipc", "cuda:0", emulated=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ranks_pick_cuda_ipc() -> None:
    assert select_data_plane("auto", "127.0.0.1:1", "cuda:0") == "cuda-ipc"
    assert select_data_plane("auto", "10.1.2.3:1", "cuda:0") == "grpc"
    assert expert_planes("auto", "cuda:0", emulated=False) == (False, True)


def test_expert_planes() -> None:
    assert expert_planes("auto", "cpu", emulated=False) == (True, False)
    assert expert_planes("auto", "cpu", emulated=True) == (False, False)
    assert expert_planes("grpc", "cpu", emulated=False) == (False, False)
    assert expert_planes("shm", "cpu", emulated=False) == (True, False)
    with pytest.raises(InvalidArgument, match="emulated"):
        expert_planes("shm", "cpu", emulated=True)
    with pytest.raises(InvalidArgument, match="not cpu"):
        expert_planes("shm", "cuda:0", emulated=False)


def test_confirmation_by_the_expert_rank() -> None:
    cpu = expert_pb2.ExpertInfo(shm_data_plane=True)
    bare = expert_pb2.ExpertInfo()
    gpu = expert_pb2.ExpertInfo(cuda_ipc_data_plane=True, gpu_uuids=["GPU-a", "GPU-b"])
    assert confirm_data_plane("auto", "shm", cpu) == "shm"
    assert confirm_data_plane("auto", "shm", bare) == "grpc"
    assert confirm_data_plane("auto", "grpc", bare) == "grpc"
    assert confirm_data_plane("auto", "cuda-ipc", gpu, gpu_uuid="GPU-b") == "cuda-ipc"
    assert confirm_data_plane("auto", "cuda-ipc", gpu, gpu_uuid="GPU-z") == "grpc"  # a GPU it cannot see
    assert confirm_data_plane("auto", "cuda-ipc", cpu, gpu_uuid="GPU-a") == "grpc"
    with pytest.raises(InvalidArgument, match="does not accept shared memory"):
        confirm_data_plane("shm", "shm", bare, where="0 at x:1")
    with pytest.raises(InvalidArgument, match="cannot see GPU GPU-z"):
        confirm_data_plane("cuda-ipc", "cuda-ipc", gpu, gpu_uuid="GPU-z")
    with pytest.raises(InvalidArgument, match="does not accept CUDA IPC"):
        confirm_data_plane("cuda-ipc", "cuda-ipc", bare, gpu_uuid="GPU-a")


def test_fast_plane_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from asap.dataplane.select import confirm_fast, expert_accepts_fast, fast_possible

    monkeypatch.setattr("asap.dataplane.select.flags_available", lambda: False)  # a process without them

    assert fast_possible("auto", "127.0.0.1:1", "cpu") and fast_possible("fast", "localhost:1", "cpu")
    assert not fast_possible("auto", "10.1.2.3:1", "cpu")  # another host: the rings cannot reach it
    assert not fast_possible("auto", "127.0.0.1:1", "cuda:0")  # GPU ranks: cuda-ipc for now
    assert not fast_possible("shm", "127.0.0.1:1", "cpu") and not fast_possible("grpc", "127.0.0.1:1", "cpu")
    with pytest.raises(InvalidArgument, match=r"fast is not possible.*not on this host"):
        fast_possible("fast", "10.1.2.3:1", "cpu")
    # under the rings: what auto would pick (emulated compute has no rows to put in shm)
    assert select_data_plane("fast", "127.0.0.1:1", "cpu") == "shm"
    assert select_data_plane("fast", "127.0.0.1:1", "cpu", emulated=True) == "grpc"
    assert confirm_fast("auto", expert_pb2.ExpertInfo(fast_data_plane=True))
    assert not confirm_fast("auto", expert_pb2.ExpertInfo(shm_data_plane=True))
    with pytest.raises(InvalidArgument, match="does not accept fast links"):
        confirm_fast("fast", expert_pb2.ExpertInfo(), where="0 at x:1")
    assert expert_accepts_fast("auto", "cpu") and expert_accepts_fast("fast", "cpu")
    assert not expert_accepts_fast("shm", "cpu") and not expert_accepts_fast("auto", "cuda:0")
    with pytest.raises(InvalidArgument, match="not cpu"):
        expert_accepts_fast("fast", "cuda:0")
    assert expert_planes("fast", "cpu", emulated=False) == (True, False)  # shm under the rings


def test_gpu_fast_plane_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU ranks: fast where both processes have stream flags and the link settled on CUDA IPC."""
    from asap.dataplane.select import confirm_fast, expert_accepts_fast, fast_possible

    monkeypatch.setattr("asap.dataplane.select.flags_available", lambda: True)
    assert fast_possible("auto", "127.0.0.1:1", "cuda:0") and fast_possible("fast", "127.0.0.1:1", "cuda:0")
    assert not fast_possible("auto", "10.1.2.3:1", "cuda:0")
    assert expert_accepts_fast("auto", "cuda:0") and not expert_accepts_fast("cuda-ipc", "cuda:0")
    info = expert_pb2.ExpertInfo(fast_data_plane=True, cuda_ipc_data_plane=True)
    assert confirm_fast("auto", info, gpu_inner="cuda-ipc")
    assert not confirm_fast("auto", info, gpu_inner="grpc")  # no CUDA IPC to the expert: no GPU slots
    with pytest.raises(InvalidArgument, match="need CUDA IPC"):
        confirm_fast("fast", info, where="0 at x:1", gpu_inner="grpc")
    assert not confirm_fast("auto", expert_pb2.ExpertInfo(cuda_ipc_data_plane=True), gpu_inner="cuda-ipc")
    monkeypatch.setattr("asap.dataplane.select.flags_available", lambda: False)
    assert not fast_possible("auto", "127.0.0.1:1", "cuda:0")
    with pytest.raises(InvalidArgument, match="stream flags"):
        fast_possible("fast", "127.0.0.1:1", "cuda:0")
    with pytest.raises(InvalidArgument, match="stream flags"):
        expert_accepts_fast("fast", "cuda:0")
