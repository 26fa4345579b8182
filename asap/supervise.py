"""Restarting a local cluster's dead children (``asap up --restart on-failure``). No process handling here.

A service child that exits on its own while the cluster runs is either the end of the cluster
(``--restart no``, the default: ``asap up`` stops everything, as before) or restarted in place on the
same address (``on-failure``), so its peers take it back without restarting anything else: the
scheduler's health monitor marks a returning attention rank up, an attention rank reopens its stream to
a returning expert rank. Restarts back off exponentially, so a child that dies at start-up again and again
does not spin; a child that then stays up long enough earns a fresh back-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asap.errors import InvalidArgument

RESTART_POLICIES = ("no", "on-failure")


@dataclass(slots=True)
class Backoff:
    """Delays between restarts of one child: ``initial_s``, doubling to ``max_s``; reset after the child
    ran ``stable_s`` without exiting."""

    initial_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    attempts: int = 0
    """Restarts since the last reset."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise InvalidArgument(f"need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")

    def next_delay(self, ran_s: float) -> float:
        """The delay before the next restart of a child that exited after running ``ran_s``."""
        if ran_s >= self.stable_s:
            self.attempts = 0
        delay = min(self.max_s, self.initial_s * 2.0**self.attempts)
        self.attempts += 1
        return delay


@dataclass(slots=True)
class RestartPlan:
    """Which children are due for a restart and when (monotonic time); one ``Backoff`` per child name."""

    policy: str = "no"
    backoffs: dict[str, Backoff] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in RESTART_POLICIES:
            raise InvalidArgument(
                f"restart policy must be one of {', '.join(RESTART_POLICIES)}, got {self.policy!r}"
            )

    def exited(self, name: str, code: int, ran_s: float, now: float) -> float | None:
        """A child exited with ``code`` after ``ran_s``: the delay until its restart, or ``None`` when the
        policy does not restart it (then the cluster stops). A clean exit (0) is never restarted."""
        if self.policy == "no" or code == 0:
            return None
        delay = self.backoffs.setdefault(name, Backoff()).next_delay(ran_s)
        self.due[name] = now + delay
        return delay

    def ready(self, now: float) -> list[str]:
        """Names whose restart time has come; each is returned once."""
        names = [name for name, at in self.due.items() if at <= now]
        for name in names:
            del self.due[name]
        return names


__all__ = ["RESTART_POLICIES", "Backoff", "RestartPlan"]
