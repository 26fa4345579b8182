"""RegisteredBuffers: one buffer per key, registered once, recognised by address, deregistered at close."""

from __future__ import annotations

import torch

from asap.dataplane.nixl_pool import RegisteredBuffers


def _pool() -> tuple[RegisteredBuffers, list[int], list[int]]:
    registered: list[int] = []
    dropped: list[int] = []

    def register(buf: torch.Tensor) -> int:
        registered.append(int(buf.data_ptr()))
        return int(buf.data_ptr())

    return RegisteredBuffers(4096, torch.device("cpu"), register, dropped.append), registered, dropped


def test_a_key_is_registered_once_and_its_buffer_reused() -> None:
    pool, registered, _ = _pool()
    first = pool.get(0)
    assert first.numel() == 4096 and first.dtype == torch.uint8
    assert pool.get(0).data_ptr() == first.data_ptr()
    other = pool.get(3)
    assert other.data_ptr() != first.data_ptr()
    assert registered == [first.data_ptr(), other.data_ptr()] and pool.registrations == 2


def test_owns_views_inside_a_buffer_only() -> None:
    pool, _, _ = _pool()
    buf = pool.get(1)
    assert pool.owns(buf[:1024].view(torch.float32).view(16, 16))
    assert pool.owns(buf[4000:])
    assert not pool.owns(torch.empty(16))
    assert not pool.owns(torch.empty(8192, dtype=torch.uint8))


def test_close_deregisters_every_buffer() -> None:
    pool, registered, dropped = _pool()
    pool.get(0), pool.get(1)
    pool.close()
    assert sorted(dropped) == sorted(registered)
    assert not pool.owns(torch.empty(1))
    pool.close()  # idempotent
    assert len(dropped) == 2
