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


def _lane_and_end(log: _Log) -> tuple[GpuFastLane, GpuExpertLinkEnd, list[tuple[int, AsapError | None]]]:
    lane = GpuFastLane.__new__(GpuFastLane)
    lane.flags = log
    lane.stream = None  # type: ignore[assignment]  # torch.cuda.stream(None) does nothing
    lane.steps = SimpleNamespace(rows_at=1000, inner_at=1008, locate=lambda layer: (0, layer))  # type: ignore[assignment]
    lane.executor = SimpleNamespace(stats=ExpertStats())  # type: ignore[assignment]
    lane.graph_steps = 0
    lane._launch_lock = threading.Lock()
    lane._collect = lambda: None  # type: ignore[method-assign]
    end = GpuExpertLinkEnd.__new__(GpuExpertLinkEnd)
    end.geometry = _GEOMETRY
    end.slots_buf = torch.zeros(16, dtype=torch.uint8)
    end.buckets = (16, 32)
    end.graphs = {(1, 32, 0): _Graph(log, "s1b32")}  # type: ignore[dict-item]
    end._poisoned = False
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
    assert log.ops == [
        ("wait", request_flag, 7),
        ("write", 1000, 20),  # the row count the graph masks by
        ("write", 1008, 3),  # the layer within its window
        ("replay", "s1b32"),
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
