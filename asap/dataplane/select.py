"""Which data plane a link uses: gRPC bytes, POSIX shared memory (CPU) or CUDA IPC (GPU).

Both ends take part. The attention rank picks a candidate from the target's address, its own device and
the compute backend (``select_data_plane``); the expert rank says in ``ExpertInfo`` which planes it accepts
and which GPUs it can map (``expert_planes``); ``confirm_data_plane`` settles the link. ``auto`` falls
back to gRPC wherever a same-host plane is not possible; a forced plane fails with ``InvalidArgument``
naming why.
"""

from __future__ import annotations

import socket

import torch

from asap.errors import InvalidArgument
from asap.v1 import expert_pb2

__all__ = [
    "DATA_PLANES",
    "confirm_data_plane",
    "expert_planes",
    "is_local_target",
    "select_data_plane",
]

DATA_PLANES = ("auto", "grpc", "shm", "cuda-ipc")
"""Values of ``--data-plane``: ``auto`` picks shm for same-host CPU ranks, cuda-ipc for same-host GPU
ranks, else grpc."""

_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _check_mode(mode: str) -> None:
    if mode not in DATA_PLANES:
        raise InvalidArgument(f"data plane must be one of {', '.join(DATA_PLANES)}, got {mode!r}")


def is_local_target(target: str) -> bool:
    """Whether ``target`` (``host:port``, ``[v6]:port`` or ``unix:PATH``) names this host."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rpartition(":")[0] if ":" in target else target
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host == "::1" or host.startswith("127."):
        return True
    return host == socket.gethostname().lower()  # no DNS lookups here


def _same_host_plane(device: str) -> str:
    return "cuda-ipc" if torch.device(device).type == "cuda" else "shm"


def select_data_plane(mode: str, target: str, device: str, *, emulated: bool = False) -> str:
    """The candidate plane (``grpc``, ``shm`` or ``cuda-ipc``) of a link to ``target`` from a rank on
    ``device``, before the expert rank's answer (``confirm_data_plane``)."""
    _check_mode(mode)
    if mode == "grpc":
        return "grpc"
    plane = _same_host_plane(device) if mode == "auto" else mode
    reasons = []
    if not is_local_target(target):
        reasons.append(f"expert target {target} is not on this host")
    if plane != _same_host_plane(device):
        kind = "cpu" if plane == "shm" else "cuda"
        reasons.append(f"device {device} is not {kind} ({plane} serves {kind} ranks)")
    if plane == "cuda-ipc" and not torch.cuda.is_available():
        reasons.append("this process has no CUDA")
    if emulated:
        reasons.append("emulated compute moves no activations")
    if not reasons:
        return plane
    if mode != "auto":
        raise InvalidArgument(f"--data-plane {mode} is not possible: {'; '.join(reasons)}")
    return "grpc"


def confirm_data_plane(
    mode: str, candidate: str, info: expert_pb2.ExpertInfo, *, gpu_uuid: str = "", where: str = ""
) -> str:
    """The link's plane once the expert rank's ``info`` is known: the candidate if the expert accepts it
    (for cuda-ipc: and can map memory of GPU ``gpu_uuid``), else gRPC (``auto``) or ``InvalidArgument``."""
    reason = ""
    if candidate == "shm" and not info.shm_data_plane:
        reason = "it does not accept shared memory (started with --data-plane grpc, or not on cpu?)"
    elif candidate == "cuda-ipc":
        if not info.cuda_ipc_data_plane:
            reason = "it does not accept CUDA IPC (started with --data-plane grpc, or not on cuda?)"
        elif gpu_uuid not in info.gpu_uuids:
            reason = f"it cannot see GPU {gpu_uuid} of this rank (CUDA_VISIBLE_DEVICES?)"
    if not reason:
        return candidate
    if mode != "auto":
        raise InvalidArgument(f"--data-plane {mode} is not possible: expert rank {where}: {reason}")
    return "grpc"


def expert_planes(mode: str, device: str, *, emulated: bool) -> tuple[bool, bool]:
    """(accepts shm, accepts cuda-ipc) of an expert rank on ``device``; a forced plane that is not
    possible raises ``InvalidArgument``."""
    _check_mode(mode)
    if mode == "grpc":
        return False, False
    kind = torch.device(device).type
    shm = kind == "cpu" and not emulated
    cuda = kind == "cuda" and not emulated and torch.cuda.is_available()
    if mode == "shm" and not shm:
        raise InvalidArgument(
            f"--data-plane shm is not possible: {'emulated compute' if emulated else f'device {device} is not cpu'}"
        )
    if mode == "cuda-ipc" and not cuda:
        why = "emulated compute" if emulated else f"device {device} is not an available cuda device"
        raise InvalidArgument(f"--data-plane cuda-ipc is not possible: {why}")
    return shm, cuda
