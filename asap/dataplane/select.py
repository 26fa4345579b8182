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

from asap.dataplane.gpu_flags import flags_available
from asap.errors import InvalidArgument
from asap.v1 import expert_pb2

__all__ = [
    "DATA_PLANES",
    "confirm_data_plane",
    "confirm_fast",
    "expert_accepts_fast",
    "expert_planes",
    "fast_possible",
    "is_local_target",
    "select_data_plane",
]

DATA_PLANES = ("auto", "grpc", "shm", "cuda-ipc", "fast", "nixl")
"""Values of ``--data-plane``: ``auto`` picks fast for same-host ranks where the expert rank accepts it
(CPU ranks, real or emulated compute; GPU ranks with stream flags, ``asap.dataplane.gpu_flags``, over
CUDA IPC), else shm for same-host CPU ranks, cuda-ipc for same-host GPU ranks, nixl for a remote expert
rank when both ends have NIXL (``asap.dataplane.nixl_select``), else grpc. ``fast`` forces the descriptor
rings (``asap.dataplane.fast``, ``asap.dataplane.gpu_fast``); what they do not carry goes over the plane
``auto`` would pick without them. ``nixl`` forces NIXL WRITEs (any host; gRPC bytes under it)."""

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


def fast_possible(mode: str, target: str, device: str) -> bool:
    """Whether the attention rank may try the ``fast`` plane to ``target`` (before the expert's answer);
    a forced ``fast`` that is not possible raises ``InvalidArgument``."""
    _check_mode(mode)
    if mode not in ("auto", "fast"):
        return False
    reasons = []
    if not is_local_target(target):
        reasons.append(f"expert target {target} is not on this host")
    kind = torch.device(device).type
    if kind == "cuda":
        if not flags_available():
            reasons.append(f"device {device}: no CUDA stream flags in this process (cuda.bindings missing?)")
    elif kind != "cpu":
        reasons.append(f"device {device} is neither cpu nor cuda")
    if reasons and mode == "fast":
        raise InvalidArgument(f"--data-plane fast is not possible: {'; '.join(reasons)}")
    return not reasons


def confirm_fast(
    mode: str, info: expert_pb2.ExpertInfo, *, where: str = "", gpu_inner: str | None = None
) -> bool:
    """Whether the link uses the ``fast`` plane, once the expert rank's ``info`` is known. ``gpu_inner``
    (GPU ranks): the plane the link settled on without the rings, which must be ``cuda-ipc``, since the
    slots lie in CUDA IPC memory the expert rank maps; None for CPU ranks."""
    reason = ""
    if not info.fast_data_plane:
        reason = "it does not accept fast links (started with --data-plane grpc or shm, or no stream flags?)"
    elif gpu_inner is not None and gpu_inner != "cuda-ipc":
        reason = f"GPU fast links need CUDA IPC to it, and the link settled on {gpu_inner}"
    if not reason:
        return True
    if mode == "fast":
        raise InvalidArgument(f"--data-plane fast is not possible: expert rank {where}: {reason}")
    return False


def expert_accepts_fast(mode: str, device: str) -> bool:
    """Whether an expert rank on ``device`` accepts fast links: CPU ranks, and CUDA ranks whose process
    has stream flags (``InvalidArgument`` if forced where not possible)."""
    _check_mode(mode)
    kind = torch.device(device).type
    able = kind == "cpu" or (kind == "cuda" and flags_available())
    if mode == "fast" and not able:
        raise InvalidArgument(
            f"--data-plane fast is not possible: device {device} is not cpu, nor cuda with stream flags"
        )
    return able and mode in ("auto", "fast")


def _same_host_plane(device: str) -> str:
    return "cuda-ipc" if torch.device(device).type == "cuda" else "shm"


def select_data_plane(mode: str, target: str, device: str, *, emulated: bool = False) -> str:
    """The candidate plane (``grpc``, ``shm`` or ``cuda-ipc``) of a link to ``target`` from a rank on
    ``device``, before the expert rank's answer (``confirm_data_plane``)."""
    _check_mode(mode)
    if mode in ("grpc", "nixl"):  # nixl: gRPC bytes under it (asap.dataplane.nixl_select decides on it)
        return "grpc"
    if mode == "fast":  # the plane under the rings: what auto would pick
        mode = "auto"
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
    if mode == "fast":  # the plane under the rings falls back as auto does
        mode = "auto"
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
    if mode in ("grpc", "nixl"):
        return False, False
    if mode == "fast":  # the plane under the rings, as auto
        mode = "auto"
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
