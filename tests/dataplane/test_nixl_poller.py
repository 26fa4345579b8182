"""The NIXL poll thread's pacing (``asap.dataplane.nixl_link.NixlPoller``): it naps ``WRITE_NAP_S`` between
looks at an end whose WRITEs are in progress (never a sweep without a sleep: a spinning poll thread takes
the core the transfer needs), starts over quickly after a notification, and backs off when idle."""

from __future__ import annotations

import time

import pytest

from asap.dataplane.nixl_link import WRITE_NAP_S, NixlPoller


class _End:
    """Answers ``script`` sweep by sweep: (notifications came, WRITEs in progress); then stops the poller."""

    def __init__(self, poller: NixlPoller, script: list[tuple[bool, bool]]) -> None:
        self.poller, self.script, self.sweep = poller, script, -1

    def poll(self, now_ns: int) -> bool:
        self.sweep += 1
        if self.sweep == len(self.script) - 1:
            self.poller._stopped = True  # this is the last sweep
        return self.script[self.sweep][0]

    @property
    def writing(self) -> bool:
        return self.script[self.sweep][1]


def test_naps_while_writing_and_backs_off_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    poller = NixlPoller("test-nixl")
    script = [(False, True)] * 3 + [(True, False)] + [(False, False)] * 3 + [(False, True), (False, False)]
    end = _End(poller, script)
    poller._endpoints = (end,)  # served on this thread: no poll thread started
    poller._run()
    # 3 naps while writing; a notification: straight on; idle: 20, 40, 80 µs; writing again: a nap and
    # the back-off starts over
    assert slept == pytest.approx([WRITE_NAP_S] * 3 + [20e-6, 40e-6, 80e-6] + [WRITE_NAP_S] + [20e-6])
