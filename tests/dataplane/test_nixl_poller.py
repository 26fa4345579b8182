"""The NIXL poll thread's pacing (``asap.dataplane.nixl_link.NixlPoller``): it naps ``WRITE_NAP_S`` between
looks at an end whose WRITEs are in progress (never a sweep without a sleep: a spinning poll thread takes
the core the transfer needs), starts over quickly after a notification, and backs off when idle."""

from __future__ import annotations

import time

import pytest

from asap.dataplane.nixl_link import AWAITED_PARK_S, WRITE_NAP_S, NixlPoller


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

    awaited = False


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


class _AwaitedEnd(_End):
    """Nothing comes for a while, and a coroutine waits for an answer in the sweeps ``awaited_in``."""

    def __init__(self, poller: NixlPoller, sweeps: int, awaited_in: range) -> None:
        super().__init__(poller, [(False, False)] * sweeps)
        self.awaited_in = awaited_in

    @property
    def awaited(self) -> bool:  # type: ignore[override]
        return self.sweep in self.awaited_in


def test_looks_as_often_as_a_waiting_compute_thread_while_a_coroutine_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    poller = NixlPoller("test-nixl")
    end = _AwaitedEnd(poller, 20, range(0, 10))
    poller._endpoints = (end,)
    poller._run()
    waiting, after = slept[:10], slept[10:]
    assert max(waiting) == pytest.approx(AWAITED_PARK_S) and waiting[0] == pytest.approx(20e-6)
    # nobody waits any more: the idle back-off starts over and grows past the waiting cap to 1 ms
    assert after[0] == pytest.approx(20e-6) and max(after) == pytest.approx(1e-3)
