"""The failure bound of the reliability contract (DESIGN §12): how soon a call that needs a dead or frozen
rank fails with UNAVAILABLE. One number, from which every detector of the mesh takes its share.

A killed rank is seen at once (its streams break). A frozen one (SIGSTOP, a wedged host) keeps its TCP
connections open and answers nothing, so each hop finds it by a heartbeat or a deadline, and each of those
must fire early enough that detection plus propagation stays inside the bound:

- gRPC keepalive on every channel and server (``asap.rpc.server.GRPC_OPTIONS``): a PING
  ``keepalive_time_s`` after the last one, which must be acknowledged within ``ping_timeout_s`` (grpc
  core acknowledges without the Python side, so a busy rank still answers; a stopped one does not): a
  frozen peer of a stream is found within 0.9 of the bound, and no sooner than ``ping_timeout_s``;
- the scheduler's health probe of the attention ranks: ``probe_timeout_s`` per probe, one a second;
- the fast plane's peer heartbeat (``asap.dataplane.fast``): ``peer_timeout_s``, below the earliest
  keepalive failure, so that on the fast plane the heartbeat names the frozen peer first.

The bound is read from ``ASAP_FAULT_BOUND_S`` (seconds; default 5), once per process, so one setting in
the environment of ``asap up`` (or a pod spec) reaches every service.
"""

from __future__ import annotations

import os

from asap.errors import InvalidArgument

FAULT_BOUND_ENV = "ASAP_FAULT_BOUND_S"
DEFAULT_FAULT_BOUND_S = 5.0


def fault_bound_s() -> float:
    """The configured bound (``ASAP_FAULT_BOUND_S``, default 5 s); at least 1 s."""
    raw = os.environ.get(FAULT_BOUND_ENV, "")
    if not raw:
        return DEFAULT_FAULT_BOUND_S
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{FAULT_BOUND_ENV} must be a number of seconds, got {raw!r}") from None
    if value < 1.0:
        raise InvalidArgument(f"{FAULT_BOUND_ENV} must be >= 1 s, got {value}")
    return value


def keepalive_time_s(bound_s: float) -> float:
    """The keepalive PING interval."""
    return 0.3 * bound_s


def ping_timeout_s(bound_s: float) -> float:
    """How long a keepalive PING may go unacknowledged."""
    return 0.6 * bound_s


def probe_timeout_s(bound_s: float) -> float:
    """The scheduler's health probe timeout: with one probe a second, found within this plus 1 s."""
    return max(0.5, 0.4 * bound_s)


def peer_timeout_s(bound_s: float) -> float:
    """The fast plane's heartbeat age taken for a dead or frozen peer: half the bound (propagation takes
    little; below ``ping_timeout_s``, so the heartbeat, not a broken stream, reports the peer)."""
    return 0.5 * bound_s


__all__ = [
    "DEFAULT_FAULT_BOUND_S",
    "FAULT_BOUND_ENV",
    "fault_bound_s",
    "keepalive_time_s",
    "peer_timeout_s",
    "ping_timeout_s",
    "probe_timeout_s",
]
