"""Whether a link uses the ``nixl`` plane, and why (or why not): the part of the data-plane choice that
concerns remote peers (``asap.dataplane.select`` decides the same-host planes).

``auto`` picks NIXL for an expert rank that is not on this host when NIXL is importable here and the
expert rank says in ``ExpertInfo.nixl_data_plane`` that it accepts NIXL links; otherwise gRPC bytes, and
the reason is logged. ``--data-plane nixl`` forces it (on any host, also same-host: useful for tests and
for comparing UCX transports) and fails with ``InvalidArgument`` naming why where it is not possible.
Emulated compute moves no activations, so it never uses NIXL.
"""

from __future__ import annotations

from asap.dataplane.nixl_link import nixl_installed, nixl_missing
from asap.dataplane.select import is_local_target
from asap.errors import InvalidArgument
from asap.v1 import expert_pb2

__all__ = ["confirm_nixl", "expert_accepts_nixl", "nixl_candidate"]


def nixl_candidate(mode: str, target: str, *, emulated: bool) -> tuple[bool, str]:
    """(whether the attention rank tries NIXL to ``target``, why not) before the expert rank's answer."""
    if mode not in ("auto", "nixl"):
        return False, f"--data-plane {mode}"
    reasons = []
    if mode == "auto" and is_local_target(target):
        return False, f"expert target {target} is on this host (same-host planes serve it)"
    if emulated:
        reasons.append("emulated compute moves no activations")
    missing = nixl_missing()
    if missing:
        reasons.append(missing)
    if reasons and mode == "nixl":
        raise InvalidArgument(f"--data-plane nixl is not possible: {'; '.join(reasons)}")
    return not reasons, "; ".join(reasons)


def confirm_nixl(mode: str, info: expert_pb2.ExpertInfo, *, where: str = "") -> tuple[bool, str]:
    """(whether the link uses NIXL, why not) once the expert rank's ``info`` is known."""
    if info.nixl_data_plane:
        return True, ""
    reason = f"expert rank {where} does not accept NIXL links (no NIXL there, or --data-plane not auto/nixl)"
    if mode == "nixl":
        raise InvalidArgument(f"--data-plane nixl is not possible: {reason}")
    return False, reason


def expert_accepts_nixl(mode: str, *, emulated: bool) -> bool:
    """Whether an expert rank accepts NIXL links (``InvalidArgument`` if forced where not possible).
    ``auto`` only checks that NIXL is installed (it is imported on the first link, and a failure then
    refuses that link); ``nixl`` imports it at once, so a broken install fails at start-up."""
    if mode not in ("auto", "nixl"):
        return False
    reasons = []
    if emulated:
        reasons.append("emulated compute moves no activations")
    if mode == "auto":
        return not reasons and nixl_installed()
    missing = nixl_missing()
    if missing:
        reasons.append(missing)
    if reasons and mode == "nixl":
        raise InvalidArgument(f"--data-plane nixl is not possible: {'; '.join(reasons)}")
    return not reasons
