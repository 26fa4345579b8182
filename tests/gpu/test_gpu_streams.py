"""The fast plane's wait streams on a GPU (``asap.dataplane.gpu_streams``): a wait pending on one holds
no other stream of the probe (the critical ones, the other wait streams, the default stream), and a
poison on the writer releases it while every wait stream is blocked."""

from __future__ import annotations

import time

import pytest
import torch

from asap.dataplane.gpu_flags import driver_flags, flags_available, poison_value
from asap.dataplane.gpu_streams import WaitStreams, dedicated_stream, writer

pytestmark = pytest.mark.skipif(
    not flags_available(), reason="needs a CUDA GPU and cuda.bindings (stream flags)"
)


def _passes(event: torch.cuda.Event, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while not event.query():  # type: ignore[no-untyped-call]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_a_pending_wait_holds_only_its_own_stream_and_the_writer_releases_it() -> None:
    dev = torch.device("cuda", 0)
    # The kernels and the cuBLAS handle used below first, before any stream waits: their first use
    # while streams are blocked on flags hung this test when it ran alone (DESIGN §9, lazy loading).
    warm = torch.randn(256, 256, device=dev) @ torch.randn(256, 256, device=dev)
    warm[0, 1].fill_(1)
    torch.cuda.synchronize()
    flags = driver_flags()
    pool = WaitStreams(dev, budget=6)
    compute = pool.plain()
    streams = [pool.take() for _ in range(6)]
    assert all(s is not None for s in streams) and pool.take() is None  # the budget holds
    waiting = [s for s in streams if s is not None]
    words = torch.zeros(len(waiting) * 16, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    marks = []
    for i, stream in enumerate(waiting):  # every wait stream blocked on a flag nobody writes yet
        flags.wait(stream, int(words[i * 16].data_ptr()), 7)
        with torch.cuda.stream(stream):
            words[i * 16 + 1].fill_(1)  # queued behind its wait
        marks.append(torch.cuda.Event())  # type: ignore[no-untyped-call]
        marks[-1].record(stream)
    with torch.cuda.stream(compute):  # other streams go on meanwhile
        x = torch.randn(256, 256, device=dev) @ torch.randn(256, 256, device=dev)
    for stream in (compute, torch.cuda.default_stream(dev), dedicated_stream(dev)):
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        assert _passes(event)
    assert not any(m.query() for m in marks)  # type: ignore[no-untyped-call]
    poison = writer(dev)
    for i in range(len(waiting)):
        flags.write(poison, int(words[i * 16].data_ptr()), poison_value(7))
    assert all(_passes(m) for m in marks)
    assert int(words.view(-1, 16)[:, 1].sum()) == len(waiting)
    for stream in waiting:
        pool.give_back(stream)
    assert pool.leaked == 0 and pool.take() in waiting  # drained streams are reused
    assert bool(torch.isfinite(x).all())
