from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from asap.emulation.clock import Sleeper, measure_overshoot
from asap.emulation.cpu_check import cpu_report, process_cpu_s, take_snapshot


def test_sleeper_compensates_without_sleeping_short() -> None:
    sleeper = Sleeper()
    assert 0 <= sleeper.bias_s <= 2e-4
    assert measure_overshoot(samples=3) >= 0
    start = time.perf_counter()
    for _ in range(20):
        sleeper.sleep(1e-3)
    elapsed = time.perf_counter() - start
    # Never short on the real clock. How long past the deadline a loaded host wakes it is not this
    # test's business (no timed upper bound); the bias arithmetic is pinned with a fake clock in
    # test_sleeper_deadline.py.
    assert elapsed >= 0.02  # each sleep spins to its deadline
    assert sleeper.requested_s == pytest.approx(0.02)
    sleeper.sleep(0)
    sleeper.sleep(-1)
    assert sleeper.requested_s == pytest.approx(0.02)


def test_cpu_report_sees_a_busy_and_an_idle_process() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"]
    )
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    try:
        time.sleep(0.15)  # past interpreter start-up
        start = take_snapshot([busy.pid, idle.pid])
        time.sleep(0.5)
        report = cpu_report(start, take_snapshot([busy.pid, idle.pid]), cores=2)
    finally:
        busy.wait()
        idle.wait()
    # the host may be shared: the spinning process gets some CPU, the sleeping one (almost) none
    assert report.cpu_s_by_pid[busy.pid] > max(0.03, 5 * report.cpu_s_by_pid[idle.pid])
    assert report.utilisation == pytest.approx(report.cpu_s / (report.wall_s * 2))
    assert report.utilisation <= 0.6 and 0 <= report.host_utilisation <= 1
    assert "CPU" in report.summary()
    assert report.vanished == ()


def test_cpu_report_bottleneck_and_vanished() -> None:
    me = os.getpid()
    start = take_snapshot([me, 2**22 + 12345])
    assert list(start.cpu_s_by_pid) == [me]  # a pid that does not exist is left out
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
    report = cpu_report(start, take_snapshot([]), cores=1, threshold=0.5)
    assert report.vanished == (me,) and report.cpu_s == 0
    busy = cpu_report(start, take_snapshot([me]), cores=1, threshold=0.01)
    assert busy.cpu_s > 0.01 and busy.bottleneck
    calm = replace(busy, utilisation=0.1, host_utilisation=0.2, threshold=0.8)
    assert not calm.bottleneck and replace(calm, host_utilisation=0.9).bottleneck
    assert process_cpu_s(2**22 + 12345) is None
