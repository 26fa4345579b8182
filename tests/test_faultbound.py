"""The fault bound (``ASAP_FAULT_BOUND_S``) and the shares of it that each detector takes."""

from __future__ import annotations

import pytest

from asap.errors import InvalidArgument
from asap.faultbound import (
    DEFAULT_FAULT_BOUND_S,
    FAULT_BOUND_ENV,
    fault_bound_s,
    keepalive_time_s,
    peer_timeout_s,
    ping_timeout_s,
    probe_timeout_s,
)


def test_the_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULT_BOUND_ENV, raising=False)
    assert fault_bound_s() == DEFAULT_FAULT_BOUND_S == 5.0
    monkeypatch.setenv(FAULT_BOUND_ENV, "8")
    assert fault_bound_s() == 8.0
    for bad in ("soon", "0.5"):
        monkeypatch.setenv(FAULT_BOUND_ENV, bad)
        with pytest.raises(InvalidArgument, match=FAULT_BOUND_ENV):
            fault_bound_s()


@pytest.mark.parametrize("bound", [1.0, 5.0, 30.0])
def test_every_detector_fires_inside_the_bound_and_the_heartbeat_before_keepalive(bound: float) -> None:
    assert keepalive_time_s(bound) + ping_timeout_s(bound) < bound  # a frozen stream peer
    assert probe_timeout_s(bound) + 1.0 <= bound + 0.5  # a frozen attention rank (probes each second)
    assert peer_timeout_s(bound) < ping_timeout_s(bound) < bound  # the fast plane names its peer first
