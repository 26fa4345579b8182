"""Virtual devices: work runs at once, its result arrives after its charged time, devices serialise."""

from __future__ import annotations

import asyncio

import pytest

from asap.sim.devices import ChargeSleeper, Device, DeviceQueue, Inline
from asap.sim.loop import run


def _job(sleeper: ChargeSleeper, seconds: float, value: str) -> str:
    sleeper.sleep(seconds)
    return value


def test_one_device_runs_its_queues_in_order() -> None:
    device = Device("d0")
    a, b = ChargeSleeper(), ChargeSleeper()
    qa, qb = DeviceQueue([device], a), DeviceQueue([device], b)  # colocated: two ranks on one device

    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        done: list[tuple[str, float]] = []

        async def one(queue: DeviceQueue, sleeper: ChargeSleeper, seconds: float, name: str) -> None:
            done.append((await loop.run_in_executor(queue, _job, sleeper, seconds, name), loop.time()))

        await asyncio.gather(one(qa, a, 1.0, "first"), one(qb, b, 2.0, "second"), one(qa, a, 0.5, "third"))
        return done

    done, _ = run(main())
    assert done == [("first", 1.0), ("second", 3.0), ("third", 3.5)]
    assert device.busy_s == 3.5 and device.jobs == 3
    assert (qa.busy_s, qb.busy_s) == (1.5, 2.0)  # each queue's share of the device it shares


def test_separate_devices_overlap_and_a_multi_device_job_waits_for_all() -> None:
    d0, d1 = Device("d0"), Device("d1")
    s0, s1, tp = ChargeSleeper(), ChargeSleeper(), ChargeSleeper()

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        first = loop.run_in_executor(DeviceQueue([d0], s0), _job, s0, 1.0, "a")
        second = loop.run_in_executor(DeviceQueue([d1], s1), _job, s1, 2.0, "b")
        both = loop.run_in_executor(DeviceQueue([d0, d1], tp), _job, tp, 1.0, "c")  # starts at 2
        times = []
        for future in (first, second, both):
            await future
            times.append(loop.time())
        return times

    times, _ = run(main())
    assert times == [1.0, 2.0, 3.0]
    assert d0.free_at == d1.free_at == 3.0
    assert d0.busy_s == 2.0 and d1.busy_s == 3.0  # the two-device job held both for its second


def test_scale_and_errors() -> None:
    sleeper = ChargeSleeper()
    queue = DeviceQueue([Device("d")], sleeper, scale=0.5)

    def failing() -> None:
        sleeper.sleep(4.0)
        raise ValueError("bad shape")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError, match="bad shape"):
            await loop.run_in_executor(queue, failing)
        return loop.time()

    at, _ = run(main())
    assert at == 2.0  # the failure arrives when the (scaled) work would have ended
    assert sleeper.requested_s == 4.0 and sleeper.pending == 0.0


def test_inline_costs_nothing() -> None:
    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(Inline(), sum, [1, 2, 3])
        return value, loop.time()

    assert run(main())[0] == (6, 0.0)
