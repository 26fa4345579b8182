"""An announced fast-link region that no expert rank attached and no dispatch used is replaced by a
fresh announcement before the next batch, instead of that batch failing at once as "never attached"."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from asap.dataplane import fast
from asap.dataplane.fast import FastPlane
from asap.dataplane.plane import LinkSpec


class _Session:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


class _Inner:
    def close(self) -> None:
        pass


class _Stream:
    peer = "expert rank 0 at test"

    def __init__(self) -> None:
        self.session = _Session()

    def open(self) -> _Session:
        return self.session


async def test_an_idle_unattached_region_is_announced_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = LinkSpec(0, 0, 64, torch.float32, torch.device("cpu"), 1 << 20, region_bytes=1 << 20)
    stream = _Stream()
    with ThreadPoolExecutor(1) as codec:
        plane = FastPlane(spec, stream, codec, inner=_Inner())  # type: ignore[arg-type]
        try:
            first = plane.direct(2).end
            assert plane.direct(2).end is first  # young: kept
            assert len(stream.session.sent) == 1
            monkeypatch.setattr(fast, "REANNOUNCE_NS", 0)
            first.announced_ns -= 1_000_000  # idle and unattached for a millisecond: past the bound
            second = plane.direct(2).end
            assert second is not first
            assert first.broken is not None  # retired: its names and mapping released
            assert len(stream.session.sent) == 2  # the fresh region announced on the same stream
            assert stream.session.sent[1].fast_link.region != stream.session.sent[0].fast_link.region  # type: ignore[attr-defined]
        finally:
            plane.close()


async def test_a_retired_end_parks_and_polls_as_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path's scheduler may park or poll a link whose region a dead peer's stream break (here:
    a re-announcement) retired meanwhile: that must not raise (it once took the scheduler down with a
    TypeError from the released region's view)."""
    spec = LinkSpec(0, 0, 64, torch.float32, torch.device("cpu"), 1 << 20, region_bytes=1 << 20)
    with ThreadPoolExecutor(1) as codec:
        plane = FastPlane(spec, _Stream(), codec, inner=_Inner())  # type: ignore[arg-type]
        try:
            old = plane.direct(2)
            old.park(True)  # parked on the live end, as a waiting compute thread is
            monkeypatch.setattr(fast, "REANNOUNCE_NS", 0)
            old.end.announced_ns -= 1_000_000
            assert plane.direct(2).end is not old.end
            assert old.end.broken is not None
            assert list(old.park(False)) == [] and list(old.park(True)) == []
            old.poll()
        finally:
            plane.close()
