"""The captured expert step of GPU fast links (``expert_svc.gpu_graph``) on a GPU: replayed from a slot
holding garbage past the dispatch's rows, it writes over the rows exactly what the eager path computes
(``device_local_ids`` + ``compute_local``), for every bucket, slot and layer, and counts ids not hosted
here; replayed for another bucket or window than the slot's words name, or with the request flag not
holding their seq (poisoned), it changes nothing, its done flag included; when it computes, it writes the
slot's done flag itself. Both forms of the step: the fused one (Triton: checks in one kernel, results
written in place) and the torch-op one (``ASAP_GPU_FUSED_STEP=0``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.dataplane.fastlink import DONE_FLAG_AT, LinkGeometry
from asap.dataplane.gpu_fast import gpu_layout_rows
from asap.dataplane.gpu_flags import driver_flags, flags_available
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.grouped import bucket_for
from expert_svc.gpu_graph import FUSED_STEP_ENV, StepGraphs, graph_buckets, slot_words

pytestmark = pytest.mark.skipif(
    not flags_available(), reason="needs a CUDA GPU and cuda.bindings (stream flags)"
)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-ops"])
def test_captured_step_equals_the_eager_step(
    gpu_model_dir: Path, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FUSED_STEP_ENV, "1" if fused else "0")
    dev = torch.device("cuda:0")
    config = load_config(gpu_model_dir)
    hosted = range(0, config.num_experts, 2)  # the odd ids are another rank's
    with CheckpointReader(gpu_model_dir) as reader:
        part = ExpertPart.from_source(reader, config, hosted, dtype=torch.bfloat16, device=dev)
    if not StepGraphs.supported(part):
        pytest.skip("no grouped GEMM here (sm90+ and bf16)")
    h, k = config.hidden_size, config.top_k
    g = LinkGeometry(slots=2, slot_bytes=4 << 20, hidden_size=h, top_k=k, itemsize=2, device_slots=True)
    buf = torch.randint(0, 256, (g.device_nbytes,), dtype=torch.uint8, device=dev)  # garbage, NaNs too
    bad_ids = torch.zeros((), dtype=torch.int64, device=dev)
    part.device_local_ids(torch.full((1, k), -1, dtype=torch.int32, device=dev))  # its table, once
    steps = StepGraphs(part, bad_ids, largest=256)
    if fused and not steps.fused:
        pytest.skip("the fused step needs the routine's Triton kernels (Triton installed)")
    assert steps.fused == fused
    buckets = graph_buckets(g, 256)
    assert buckets == (16, 32, 64, 128, 256)
    steps.warm(buckets)
    graphs = steps.capture(buf, g, buckets, device_done=True)
    assert len(graphs) == g.slots * len(buckets) * steps.windows
    flags, stream = driver_flags(), torch.cuda.current_stream(dev)
    gen = torch.Generator(device=dev).manual_seed(3)
    cases = [(1, 0, 0), (9, 1, 1), (16, 0, 2), (100, 1, 3), (256, 0, 1)]
    for seq, (rows, slot, layer) in enumerate(cases, start=1):
        layer = config.moe_layer_ids[layer % len(config.moe_layer_ids)]
        hidden = torch.randn(rows, h, device=dev, generator=gen).to(torch.bfloat16)
        ids = torch.randint(-1, config.num_experts, (rows, k), device=dev, generator=gen, dtype=torch.int32)
        weights = torch.rand(rows, k, device=dev, generator=gen)
        foreign = rows != 100  # one dispatch with hosted ids only: the garbage past it must not count
        if foreign:
            ids[0, 0] = 1
        else:
            ids = torch.where(ids >= 0, ids - ids % 2, ids)
        local, _ = part.device_local_ids(ids)
        expected = part.compute_local(layer, hidden, local, weights).clone()
        layout = gpu_layout_rows(g, rows)
        assert layout == bucket_for(rows)
        hidden_at, ids_at, weights_at, _ = g.payload(layout, shape_only=False)
        base = g.device_slot_at(slot)
        buf[base + hidden_at : base + hidden_at + rows * h * 2].copy_(hidden.view(-1).view(torch.uint8))
        buf[base + ids_at : base + ids_at + rows * k * 4].copy_(ids.view(-1).view(torch.uint8))
        buf[base + weights_at : base + weights_at + rows * k * 4].copy_(weights.view(-1).view(torch.uint8))
        window, _ = steps.locate(layer)
        before = int(bad_ids)
        words, flag = slot_words(buf, g, slot)
        for at, value in ((0, rows), (4, layer), (8, seq)):  # as the attention's tx stream writes them
            flags.write(stream, int(words.data_ptr()) + at, value)
        flags.write(stream, int(flag.data_ptr()), seq + 1)  # not this seq (a poisoned flag): a no-op
        rows_view = buf[base + hidden_at : base + hidden_at + rows * h * 2]
        untouched = rows_view.clone()
        done = buf[base + DONE_FLAG_AT : base + DONE_FLAG_AT + 4].view(torch.int32)
        done_before = done.clone()
        graphs[(slot, layout, window)].replay()
        other = 16 if layout != 16 else 32  # a step armed for another bucket: a no-op as well
        graphs[(slot, other, window)].replay()
        torch.cuda.synchronize()
        assert torch.equal(rows_view, untouched), (rows, slot, layer)
        assert torch.equal(done, done_before)  # no done flag from a step that did not compute
        assert int(bad_ids) == before
        flags.write(stream, int(flag.data_ptr()), seq)
        graphs[(slot, layout, window)].replay()
        torch.cuda.synchronize()
        got = rows_view.view(torch.bfloat16).view(rows, h)
        assert torch.equal(got, expected), (rows, slot, layer)
        assert int(done) == seq  # written by the step itself, after the results
        odd = int(((ids >= 0) & (ids % 2 == 1)).sum())  # another rank's ids: counted, skipped
        assert (odd > 0) == foreign
        assert int(bad_ids) == before + odd
