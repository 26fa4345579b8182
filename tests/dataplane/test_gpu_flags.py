"""Stream-flag logic of the GPU fast plane without a GPU: the cyclic wait condition, poison values, and
which flags each side writes (fake flags record the writes; link ends are built around CPU memory)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from asap.dataplane.fastlink import DONE_FLAG_AT, REQUEST_FLAG_AT, LinkGeometry, Request
from asap.dataplane.gpu_fast import GpuAttentionLinkEnd
from asap.dataplane.gpu_flags import POISON_STEP, passes, poison_value
from expert_svc.gpu_fastlane import GpuExpertLinkEnd

_GEOMETRY = LinkGeometry(
    slots=3, slot_bytes=64 * 1024, hidden_size=64, top_k=2, itemsize=2, device_slots=True
)


@dataclass
class FakeFlags:
    writes: list[tuple[Any, int, int]] = field(default_factory=list)
    waits: list[tuple[Any, int, int]] = field(default_factory=list)

    def write(self, stream: Any, address: int, value: int) -> None:
        self.writes.append((stream, address, value))

    def wait(self, stream: Any, address: int, value: int) -> None:
        self.waits.append((stream, address, value))


def test_waits_pass_cyclically_so_sequence_numbers_may_wrap() -> None:
    assert passes(5, 5) and passes(6, 5) and not passes(4, 5)
    assert passes(2, 0xFFFFFFFE)  # wrapped past 2**32
    assert not passes(0xFFFFFFFE, 2)


def test_poison_releases_every_wait_of_the_link() -> None:
    for last in (1, 1000, 0xFFFFFFF0):  # the last one wraps
        value = poison_value(last)
        assert all(passes(value, (last - back) & 0xFFFFFFFF) for back in range(0, 64))
        assert passes(value, (last + POISON_STEP) & 0xFFFFFFFF)


def _slot_flags(base: int) -> set[int]:
    return {
        base + _GEOMETRY.device_slot_at(s) + at
        for s in range(_GEOMETRY.slots)
        for at in (REQUEST_FLAG_AT, DONE_FLAG_AT)
    }


def _expert_end(flags: FakeFlags) -> GpuExpertLinkEnd:
    end = GpuExpertLinkEnd.__new__(GpuExpertLinkEnd)
    end.geometry = _GEOMETRY
    end.slots_buf = torch.zeros(_GEOMETRY.device_nbytes, dtype=torch.uint8)
    end.lane = SimpleNamespace(flags=flags, stream="compute", poison_stream="poison", dtype=torch.bfloat16)  # type: ignore[assignment]
    end._lock = threading.Lock()
    end._closed = False
    end._poisoned = False
    end._last_seq = 41
    end.arm_streams, end._launched = [], {}
    return end


def _request(slot: int, seq: int) -> Request:
    return Request(
        micro_batch=1, layer=0, slot=slot, rows=4, flags=0, seq=seq, sent_unix_ns=0, not_before_ns=0
    )


def test_expert_writes_the_done_flag_for_an_error_too_and_nothing_once_poisoned() -> None:
    flags = FakeFlags()
    end = _expert_end(flags)
    base = int(end.slots_buf.data_ptr())
    end._write_back(_request(1, 42), None, True)  # an error answer: no rows, the done flag still
    assert flags.writes == [("compute", base + _GEOMETRY.device_slot_at(1) + DONE_FLAG_AT, 42)]
    end._write_back(_request(7, 43), None, False)  # a descriptor naming no slot: nothing to release
    assert len(flags.writes) == 1
    end.poison()
    poisoned = flags.writes[1:]
    assert {a for _, a, _ in poisoned} == _slot_flags(base) and all(s == "poison" for s, _, _ in poisoned)
    assert all(passes(v, 42) for _, _, v in poisoned)
    end.poison()  # once
    end._write_back(_request(2, 44), None, True)  # a retired link: its flags stay poisoned
    assert len(flags.writes) == 1 + len(poisoned)


def test_attention_poisons_every_flag_once_when_the_link_breaks() -> None:
    flags = FakeFlags()
    end = GpuAttentionLinkEnd.__new__(GpuAttentionLinkEnd)
    end.geometry = _GEOMETRY
    end.flags = flags
    end.cuda = SimpleNamespace(
        buf=torch.zeros(_GEOMETRY.device_nbytes, dtype=torch.uint8), size=_GEOMETRY.device_nbytes
    )  # type: ignore[assignment]
    end.poison_stream = "poison"  # type: ignore[assignment]
    end._gpu_lock = threading.Lock()
    end._poisoned = False
    end._prefetched = {}
    end._seq = 9
    end.poison()
    end.poison()
    base = int(end.cuda.buf.data_ptr())
    assert len(flags.writes) == 2 * _GEOMETRY.slots
    assert {a for _, a, _ in flags.writes} == _slot_flags(base)
    assert all(passes(v, seq) for _, _, v in flags.writes for seq in range(1, 10))


def test_results_are_prefetched_on_the_slot_stream_unless_the_completion_came_first() -> None:
    end = GpuAttentionLinkEnd.__new__(GpuAttentionLinkEnd)
    end._gpu_lock = threading.Lock()
    end._poisoned = False
    end._prefetched, end._taken = {}, set()
    end.rx_slots = ["rx0", "rx1"]  # type: ignore[list-item]
    copies: list[tuple[Any, int, int, int]] = []

    def copy_out(rx: Any, slot: int, seq: int, rows: int) -> tuple[Any, Any]:
        copies.append((rx, slot, seq, rows))
        return ("result", seq), ("event", seq)

    end._copy_out = copy_out  # type: ignore[method-assign,assignment]
    end.prefetch(1, 5, 20)
    assert copies == [("rx1", 1, 5, 20)] and end._prefetched == {5: (("result", 5), ("event", 5))}
    end._taken.add(6)  # its completion was taken (and copied there) before the prefetch
    end.prefetch(0, 6, 20)
    assert len(copies) == 1 and end._taken == set()
    end._poisoned = True  # a retired link: nothing more is enqueued
    end.prefetch(0, 7, 20)
    assert len(copies) == 1 and 7 not in end._prefetched
