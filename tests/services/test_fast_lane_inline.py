"""``FastLane``: where a lane computes what its poll thread took. Emulated (shape-only) ranks compute on
the thread that took the descriptors, with no hand-off; ranks with real rows hand them to the compute
thread. Either way one layer's rows from several links are merged into one call, an error fails its
dispatches only, and a stopped executor answers ``Unavailable``."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from asap.dataplane.fastlink import Completion, Request, SlotHeader
from asap.emulation import EmulatedExpertPart
from asap.emulation.clock import Sleeper
from asap.emulation.profiles import load_profile
from asap.errors import AsapError, InvalidArgument, Unavailable
from asap.model.config import load_config
from expert_svc.core import ExpertExecutor
from expert_svc.fastlane import FastLane, LaneEnd, LaneItem

H200 = load_profile("h200")


class RecordingEnd(LaneEnd):
    """A link end that records its answers and the thread that gave each."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, tuple[int, ...] | None, AsapError | None, str]] = []

    def _deliver(
        self, request: Request, out: torch.Tensor | None, error: AsapError | None, completion: Completion
    ) -> None:
        shape = None if out is None else tuple(out.shape)
        self.answers.append((request.seq, shape, error, threading.current_thread().name))


def _lane(
    model_dir: Path, *, shape_only: bool, inline: bool | None = None
) -> tuple[FastLane, ExpertExecutor]:
    config = load_config(model_dir)
    part = EmulatedExpertPart(config, list(range(config.num_experts)), H200, sleeper=Sleeper(bias_s=0.0))
    executor = ExpertExecutor(part)
    return FastLane(executor, shape_only=shape_only, inline=inline), executor


def _item(lane: FastLane, end: RecordingEnd, seq: int, layer: int, rows: int, bad: bool = False) -> LaneItem:
    k = lane.top_k
    ids = np.zeros((rows, k), dtype=np.int32)
    if bad:
        ids[0, 0] = lane.executor.part.config.num_experts  # out of range: the part rejects it
    request = Request(0, layer, 0, rows, 0, seq, 0, 0)
    with end._lock:
        end._held += 1
    return LaneItem(
        end,
        request,
        SlotHeader(0, seq, layer, rows, 0, "", ""),
        layer,
        torch.empty(rows, lane.hidden_size, dtype=lane.dtype, device="meta"),
        torch.from_numpy(ids),
        torch.ones(rows, k),
        0,
        0,
    )


def test_emulated_lane_computes_where_it_took_the_rows_and_merges_a_layer(qwen3_dir: Path) -> None:
    lane, executor = _lane(qwen3_dir, shape_only=True)
    assert lane.inline
    a, b = RecordingEnd(), RecordingEnd()
    layer = executor.part.config.moe_layer_ids[0]
    for item in (_item(lane, a, 1, layer, 3), _item(lane, b, 2, layer, 5)):
        lane.enqueue(item)
    lane._flush()  # the poll thread's flush after a sweep: computed now, on this thread
    here = threading.current_thread().name
    assert a.answers == [(1, (3, lane.hidden_size), None, here)]
    assert b.answers == [(2, (5, lane.hidden_size), None, here)]
    assert executor.stats.calls == 1 and executor.stats.rows == 8  # two links, one call
    assert lane.waiting == 0 and a._held == 0 and b._held == 0


def test_a_bad_dispatch_fails_alone_and_the_next_flush_serves(qwen3_dir: Path) -> None:
    lane, executor = _lane(qwen3_dir, shape_only=True)
    end = RecordingEnd()
    layers = executor.part.config.moe_layer_ids
    lane.enqueue(_item(lane, end, 1, layers[0], 2, bad=True))
    lane.enqueue(_item(lane, end, 2, layers[-1], 2))  # another layer: its own call
    lane._flush()
    errors = {seq: error for seq, _, error, _ in end.answers}
    assert isinstance(errors[1], InvalidArgument) and errors[2] is None
    lane.enqueue(_item(lane, end, 3, layers[0], 4))
    lane._flush()
    assert end.answers[-1][:3] == (3, (4, lane.hidden_size), None)


def test_lane_with_rows_hands_off_to_the_compute_thread(qwen3_dir: Path) -> None:
    lane, executor = _lane(qwen3_dir, shape_only=True, inline=False)
    end = RecordingEnd()
    lane.enqueue(_item(lane, end, 1, executor.part.config.moe_layer_ids[0], 2))
    lane._flush()
    executor._thread.shutdown(wait=True)  # the hand-off has run once the compute thread is done
    assert len(end.answers) == 1 and end.answers[0][3].startswith("expert-compute")
    lane_with_rows, _ = _lane(qwen3_dir, shape_only=False)
    assert not lane_with_rows.inline


async def test_a_stopped_executor_answers_unavailable(qwen3_dir: Path) -> None:
    lane, executor = _lane(qwen3_dir, shape_only=True)
    await executor.start()
    await executor.stop()
    end = RecordingEnd()
    lane.enqueue(_item(lane, end, 1, executor.part.config.moe_layer_ids[0], 2))
    lane._flush()
    assert len(end.answers) == 1 and isinstance(end.answers[0][2], Unavailable)
    assert lane.waiting == 0 and end._held == 0
