"""Which dispatches of a GPU fast link replay a captured expert step, without a GPU: the bucket layout
both ends share, the buckets captured per link, the key a dispatch selects (or the eager path), and the
poll thread's launch sequence with fake flags and graphs (``expert_svc.gpu_graph``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from asap.dataplane.fastlink import DONE_FLAG_AT, REQUEST_FLAG_AT, LinkGeometry, Request
from asap.dataplane.gpu_fast import gpu_hot_path_enabled, gpu_layout_rows
from asap.dataplane.gpu_layout import armed_steps_enabled, device_done_enabled, env_switch, prefetch_enabled
from asap.errors import AsapError, Unavailable
from expert_svc.core import ExpertStats
from expert_svc.fastlane import LaneItem
from expert_svc.gpu_fastlane import GpuExpertLinkEnd, GpuFastLane
from expert_svc.gpu_graph import (
    graph_buckets,
    step_graph_rows,
    step_graphs_enabled,
    step_key,
)

# 64 KiB slots of hidden 64 in bf16, top-2: 448 rows fit, so buckets up to 256 do
_GEOMETRY = LinkGeometry(
    slots=2, slot_bytes=64 * 1024, hidden_size=64, top_k=2, itemsize=2, device_slots=True
)


def test_rows_are_laid_out_as_their_bucket_where_it_fits() -> None:
    g = _GEOMETRY
    assert gpu_layout_rows(g, 1) == 16 and gpu_layout_rows(g, 16) == 16 and gpu_layout_rows(g, 17) == 32
    assert gpu_layout_rows(g, 300) == 300  # its bucket (512) does not fit the slot: exact layout
    assert gpu_layout_rows(g, 0) == 0
    big = LinkGeometry(slots=1, slot_bytes=1 << 30, hidden_size=64, top_k=2, itemsize=2, device_slots=True)
    assert gpu_layout_rows(big, 40000) == 40000  # past the largest bucket
    for rows in (1, 15, 16, 17, 200, 256, 300):  # the ids and weights stay inside the slot
        assert g.payload(gpu_layout_rows(g, rows), shape_only=False)[3] <= g.slot_bytes


def test_buckets_captured_per_link_and_the_key_a_dispatch_selects() -> None:
    g = _GEOMETRY
    assert graph_buckets(g, 16384) == (16, 32, 64, 128, 256)
    assert graph_buckets(g, 64) == (16, 32, 64)
    buckets = graph_buckets(g, 64)
    assert step_key(g, buckets, 1, 20, 0) == (1, 32, 0)
    assert step_key(g, buckets, 0, 64, 2) == (0, 64, 2)
    assert step_key(g, buckets, 0, 65, 0) is None  # past the largest captured bucket: eager
    assert step_key(g, buckets, 0, 0, 0) is None
    assert step_key(g, graph_buckets(g, 16384), 0, 300, 0) is None  # its bucket does not fit


def test_the_switches_default_on_and_16k_rows() -> None:
    assert step_graphs_enabled({}) and step_graphs_enabled({"ASAP_GPU_STEP_GRAPHS": "1"})
    assert not step_graphs_enabled({"ASAP_GPU_STEP_GRAPHS": "0"})
    assert not step_graphs_enabled({"ASAP_GPU_STEP_GRAPHS": "off"})
    assert step_graph_rows({}) == 16384 and step_graph_rows({"ASAP_GPU_STEP_GRAPH_ROWS": "2048"}) == 2048


def test_the_gpu_hot_path_is_off_unless_asked_for() -> None:
    assert not gpu_hot_path_enabled({}) and not gpu_hot_path_enabled({"ASAP_GPU_HOT_PATH": "0"})
    assert gpu_hot_path_enabled({"ASAP_GPU_HOT_PATH": "1"})


@dataclass
class _Log:
    ops: list[tuple[Any, ...]] = field(default_factory=list)

    def write(self, stream: Any, address: int, value: int) -> None:
        self.ops.append(("write", address, value))

    def wait(self, stream: Any, address: int, value: int) -> None:
        self.ops.append(("wait", address, value))


@dataclass
class _Graph:
    log: _Log
    name: str

    def replay(self) -> None:
        self.log.ops.append(("replay", self.name))


def _fake_streams(lane: GpuFastLane, log: _Log) -> None:
    """The lane's stream operations recorded instead of run (no GPU)."""
    lane.replay = lambda graph, stream: log.ops.append(("replay", graph.name, stream))  # type: ignore[assignment,attr-defined,method-assign]
    lane.mark = lambda stream: ("event", stream)  # type: ignore[assignment,method-assign,return-value]
    lane.order = lambda later, earlier: log.ops.append(("order", later, earlier))  # type: ignore[assignment,method-assign]


def _lane_and_end(log: _Log) -> tuple[GpuFastLane, GpuExpertLinkEnd, list[tuple[int, AsapError | None]]]:
    lane = GpuFastLane.__new__(GpuFastLane)
    lane.flags = log
    lane.stream = None  # type: ignore[assignment]  # torch.cuda.stream(None) does nothing
    lane.steps = SimpleNamespace(locate=lambda layer: (0, layer))  # type: ignore[assignment]
    lane.executor = SimpleNamespace(stats=ExpertStats())  # type: ignore[assignment]
    lane.graph_steps = lane.armed_hits = lane.armed_misses = 0
    lane._launch_lock = threading.Lock()
    lane._collect = lambda: None  # type: ignore[method-assign]
    _fake_streams(lane, log)
    end = GpuExpertLinkEnd.__new__(GpuExpertLinkEnd)
    end.lane = lane
    end.geometry = _GEOMETRY
    end.slots_buf = torch.zeros(16, dtype=torch.uint8)
    end.buckets = (16, 32)
    end.graphs = {(1, 32, 0): _Graph(log, "s1b32")}  # type: ignore[dict-item]
    end._poisoned = False
    end.arm_streams, end._armed, end._armed_after, end._launched, end._rearm = [], [], [], {}, None
    end._lock, end._closed = threading.Lock(), False
    answers: list[tuple[int, AsapError | None]] = []
    end.answer = lambda request, out, error=None, **_: answers.append((request.seq, error))  # type: ignore[method-assign]
    end.release = lambda: log.ops.append(("release",))  # type: ignore[method-assign]
    return lane, end, answers


def _item(end: GpuExpertLinkEnd, slot: int, rows: int, seq: int) -> LaneItem:
    request = Request(
        micro_batch=1, layer=3, slot=slot, rows=rows, flags=0, seq=seq, sent_unix_ns=0, not_before_ns=0
    )
    empty = torch.empty(0)
    return LaneItem(end, request, None, 3, empty, empty, empty, 0, 0)  # type: ignore[arg-type]


def test_a_captured_step_is_launched_and_answered_by_the_poll_thread() -> None:
    log = _Log()
    lane, end, answers = _lane_and_end(log)
    assert lane.step(_item(end, 1, 20, seq=7))
    request_flag = end.flag(1, REQUEST_FLAG_AT)
    assert log.ops == [  # (the row count, layer and seq the graph checks: written by the attention stream)
        ("wait", request_flag, 7),
        ("replay", "s1b32", None),
        ("release",),
    ]
    assert answers == [(7, None)] and lane.graph_steps == 1 and lane.executor.stats.rows == 20
    assert end.flag(1, DONE_FLAG_AT) != request_flag  # (the done flag goes with the answer, on the stream)


def test_dispatches_without_a_captured_step_go_to_the_compute_thread() -> None:
    log = _Log()
    lane, end, answers = _lane_and_end(log)
    assert not lane.step(_item(end, 0, 20, seq=1))  # slot 0 has no graph here
    assert not lane.step(_item(end, 1, 40, seq=2))  # 40 rows: bucket 64 not captured
    lane.steps = None
    assert not lane.step(_item(end, 1, 20, seq=3))  # captured steps off
    assert log.ops == [] and answers == []


def test_a_retired_link_fails_the_dispatch_unavailable_without_a_launch() -> None:
    log = _Log()
    lane, end, answers = _lane_and_end(log)
    end._poisoned = True
    assert lane.step(_item(end, 1, 20, seq=5))
    assert [op for op in log.ops if op[0] == "replay"] == []
    assert len(answers) == 1 and isinstance(answers[0][1], Unavailable)
    assert lane.graph_steps == 0


def _armed_end(log: _Log) -> tuple[GpuFastLane, GpuExpertLinkEnd, list[tuple[int, AsapError | None]]]:
    """An armed link of two slots: slot 1 has the steps of buckets 16 and 32; answers write back."""
    lane, end, answers = _lane_and_end(log)
    lane.stream = "compute"  # type: ignore[assignment]
    lane.dtype = torch.bfloat16
    end.graphs = {(1, 32, 0): _Graph(log, "s1b32"), (1, 16, 0): _Graph(log, "s1b16")}  # type: ignore[dict-item]
    end.arm_streams = ["arm0", "arm1"]  # type: ignore[list-item]
    end._armed, end._armed_after = [None, None], [None, None]

    def answer(request: Request, out: object, error: AsapError | None = None, **_: object) -> None:
        end._write_back(request, None, request.slot < _GEOMETRY.slots)
        answers.append((request.seq, error))

    end.answer = answer  # type: ignore[method-assign,assignment]
    return lane, end, answers


def test_an_armed_slot_computes_its_next_dispatch_before_the_descriptor_arrives() -> None:
    log = _Log()
    lane, end, answers = _armed_end(log)
    request_flag, done_flag = end.flag(1, REQUEST_FLAG_AT), end.flag(1, DONE_FLAG_AT)
    assert lane.step(_item(end, 1, 20, seq=7))  # nothing armed yet: launched on arrival, then armed
    assert log.ops == [
        ("wait", request_flag, 7),
        ("replay", "s1b32", "arm1"),
        ("write", done_flag, 7),
        ("wait", request_flag, 8),  # the slot's next dispatch: any seq past this one
        ("replay", "s1b32", "arm1"),
        ("release",),
    ]
    assert end._armed == [None, (1, 32, 0)] and end.armed_after(1) == ("event", "arm1")
    log.ops.clear()
    assert lane.step(_item(end, 1, 25, seq=9))  # same bucket: already enqueued, only the done flag
    assert log.ops == [
        ("write", done_flag, 9),
        ("wait", request_flag, 10),
        ("replay", "s1b32", "arm1"),
        ("release",),
    ]
    assert (lane.armed_hits, lane.armed_misses) == (1, 0)
    log.ops.clear()
    assert lane.step(_item(end, 1, 10, seq=11))  # another bucket: its step behind the armed one
    assert log.ops == [
        ("replay", "s1b16", "arm1"),  # no wait: the armed step's wait is ahead of it on the stream
        ("write", done_flag, 11),
        ("wait", request_flag, 12),
        ("replay", "s1b16", "arm1"),  # armed for the bucket just seen
        ("release",),
    ]
    assert (lane.armed_hits, lane.armed_misses) == (1, 1)
    assert answers == [(7, None), (9, None), (11, None)] and lane.graph_steps == 3


def test_an_eager_dispatch_on_an_armed_slot_waits_for_the_armed_step_and_disarms_it() -> None:
    log = _Log()
    lane, end, answers = _armed_end(log)
    request_flag, done_flag = end.flag(1, REQUEST_FLAG_AT), end.flag(1, DONE_FLAG_AT)
    assert lane.step(_item(end, 1, 20, seq=3))
    log.ops.clear()
    assert not lane.step(_item(end, 1, 40, seq=4))  # bucket 64 not captured: the compute thread's
    assert end.armed_after(1) == ("event", "arm1")  # what its stream waits for before using the slot
    end._write_back(_item(end, 1, 40, seq=4).request, None, True)  # its answer, from the compute thread
    assert log.ops == [("order", "arm1", "compute"), ("write", done_flag, 4)]  # the done flag after it
    assert end._armed[1] is None and end.armed_after(1) is None  # consumed, not re-armed
    log.ops.clear()
    assert lane.step(_item(end, 1, 20, seq=5))  # launched on arrival again (wait + step), re-armed
    assert log.ops[:2] == [("wait", request_flag, 5), ("replay", "s1b32", "arm1")]
    assert end._armed[1] == (1, 32, 0)
    assert [seq for seq, _ in answers] == [3, 5]


def test_an_error_on_an_armed_slot_writes_its_done_flag_on_the_slot_stream_and_disarms() -> None:
    log = _Log()
    lane, end, answers = _armed_end(log)
    done_flag = end.flag(1, DONE_FLAG_AT)
    assert lane.step(_item(end, 1, 20, seq=3))
    log.ops.clear()
    end._poisoned = True
    assert lane.step(_item(end, 1, 20, seq=5))  # retired meanwhile: Unavailable, nothing launched
    assert isinstance(answers[-1][1], Unavailable)
    assert [op for op in log.ops if op[0] in ("replay", "wait")] == []
    end._poisoned = False
    log.ops.clear()
    end._write_back(_item(end, 1, 20, seq=6).request, None, True)  # a rejected descriptor's answer
    assert log.ops == [("order", "arm1", "compute"), ("write", done_flag, 6)]
    assert end._armed[1] is None


def test_armed_steps_and_prefetch_default_on_the_device_done_flag_off() -> None:
    assert armed_steps_enabled({}) and armed_steps_enabled({"ASAP_GPU_ARMED_STEPS": "1"})
    assert not armed_steps_enabled({"ASAP_GPU_ARMED_STEPS": "0"})
    assert prefetch_enabled({}) and not prefetch_enabled({"ASAP_GPU_PREFETCH": "0"})
    assert not device_done_enabled({}) and device_done_enabled({"ASAP_GPU_DEVICE_DONE": "1"})


def test_env_switch_reads_on_and_off_words_against_its_default() -> None:
    for word in ("0", "off", " OFF ", "false", "no"):
        assert not env_switch("X", True, {"X": word})
    for word in ("1", "on", "True", " yes "):
        assert env_switch("X", False, {"X": word})
    assert env_switch("X", True, {}) and env_switch("X", True, {"X": " "})
    assert not env_switch("X", False, {}) and not env_switch("X", False, {"X": ""})
    assert env_switch("X", True, {"X": "maybe"}) and not env_switch("X", False, {"X": "maybe"})
