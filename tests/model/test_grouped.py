"""The layer-agnostic grouped routine: one code path for every layer, equal to the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from asap.model import grouped
from asap.model.config import parse_config
from asap.model.expert_part import ExpertPart
from asap.model.grouped import LayerAgnosticExperts, bucket_for


def _part(layers: int = 5, experts: int = 6, hidden: int = 16, inter: int = 8) -> ExpertPart:
    config = parse_config(
        {
            "model_type": "mixtral", "vocab_size": 32, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": experts,
            "num_experts_per_tok": 2, "intermediate_size": inter,
        }
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    return ExpertPart(
        config,
        range(experts),
        gate_up=torch.randn(layers, experts, 2 * inter, hidden, generator=g),
        down=torch.randn(layers, experts, hidden, inter, generator=g),
    )


@pytest.mark.parametrize("max_groups", [1023, 13, 6])
def test_every_layer_matches_the_per_expert_loop(monkeypatch: pytest.MonkeyPatch, max_groups: int) -> None:
    """Windows of whole layers (small max_groups forces several) give the same results."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    part = _part()
    routine = LayerAgnosticExperts(part.gate_up, part.down, fused=False)
    assert len(routine.windows) == -(-5 // max(1, max_groups // 6))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 16, generator=g)
    ids = torch.randint(-1, 6, (9, 2), generator=g)
    ids[0] = -1  # a token with no slot here
    weights = torch.rand(9, 2, generator=g)
    for layer in range(5):
        expected = part.compute(layer, hidden, ids, weights)
        got = routine(layer, hidden, ids, weights)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[0], torch.zeros(16))


def test_buckets_cover_any_size() -> None:
    assert [bucket_for(n) for n in (1, 16, 17, 1000, 32768)] == [16, 16, 32, 1024, 32768]
    assert bucket_for(40000) == 65536 and bucket_for(40000) >= 40000


def test_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    part = _part()
    monkeypatch.delenv(grouped.KERNELS_ENV, raising=False)
    assert LayerAgnosticExperts(part.gate_up, part.down, fused=False).kernels == "eager"  # CPU default
    monkeypatch.setenv(grouped.KERNELS_ENV, "eager")
    assert LayerAgnosticExperts(part.gate_up, part.down, fused=False).kernels == "eager"
    with pytest.raises(ValueError, match="expected"):
        LayerAgnosticExperts(part.gate_up, part.down, fused=False, kernels="fast")
    monkeypatch.setenv(grouped.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match=grouped.KERNELS_ENV):
        LayerAgnosticExperts(part.gate_up, part.down, fused=False)


def test_layers_per_window_caps_the_windows() -> None:
    part = _part()
    routine = LayerAgnosticExperts(part.gate_up, part.down, fused=False, layers_per_window=2)
    assert [(w.first, w.count) for w in routine.windows] == [(0, 2), (2, 2), (4, 1)]
    assert routine.locate(3) == (1, 1)


def test_gemm_rows_pad_for_the_large_tile_only_when_fused_and_many_rows() -> None:
    part = _part()  # 6 experts, 5 layers: one window of 30 groups
    fused = LayerAgnosticExperts(part.gate_up, part.down, fused=True, large_tile_rows=10)
    assert fused._gemm_rows(59, 30) == 59  # under 10 slots per expert
    assert fused._gemm_rows(60, 30) == 129 * 30  # past 128 rows per group
    assert fused._gemm_rows(5000, 30) == 5000
    loop = LayerAgnosticExperts(part.gate_up, part.down, fused=False, large_tile_rows=10)
    assert loop._gemm_rows(60, 30) == 60


# ---- Triton kernels: on CUDA where there is one, else on CPU tensors through Triton's interpreter ----
# (the ``triton_device`` fixture of tests/model/conftest.py)


def test_triton_kernels_each_match_torch(triton_device: torch.device) -> None:
    from asap.model import grouped_triton as kernels

    dev = triton_device
    g = torch.Generator().manual_seed(2)
    n, k, h, inter = 7, 3, 24, 40  # H and I not powers of two: masked tails
    hidden = torch.randn(n, h, generator=g).to(dev)
    order = torch.randperm(n * k, generator=g).to(dev)
    count = torch.tensor([n * k - 5], dtype=torch.int32, device=dev)  # the last 5 sorted rows are skipped
    x, inverse = kernels.gather_rows(hidden, order, count, k, rows=n * k + 4)
    assert x.shape == (n * k + 4, h)
    valid = order[: n * k - 5]
    torch.testing.assert_close(x[: n * k - 5], hidden[valid // k])
    assert torch.equal(inverse[valid].cpu(), torch.arange(n * k - 5))

    h1 = torch.randn(n * k, 2 * inter, generator=g).to(dev)
    act = kernels.silu_mul(h1, count)
    want = torch.nn.functional.silu(h1[:, :inter]) * h1[:, inter:]
    torch.testing.assert_close(act[: n * k - 5], want[: n * k - 5], rtol=1e-5, atol=1e-5)

    ids = torch.randint(-1, 4, (n, k), generator=g)
    ids[0] = -1
    weights = torch.rand(n, k, generator=g)
    perm = torch.randperm(n * k, generator=g)  # sorted position of each slot
    y = torch.randn(n * k, h, generator=g)
    y[perm[ids.reshape(-1) < 0]] = float("nan")  # rows of skipped slots are never read
    out = kernels.combine(y.to(dev), ids.to(dev), weights.to(dev), perm.to(dev))
    unsorted = y[perm].view(n, k, h)
    want = torch.where((ids >= 0)[..., None], unsorted * weights[..., None], 0.0).sum(1)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0].cpu(), torch.zeros(h))


@pytest.mark.parametrize("max_groups", [1023, 13])
def test_triton_routine_matches_the_per_expert_loop(
    monkeypatch: pytest.MonkeyPatch, triton_device: torch.device, max_groups: int
) -> None:
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    part = _part()
    dev = triton_device
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    fused = grouped.grouped_mm_available(dev)
    gate_up, down = part.gate_up.to(dev, dtype), part.down.to(dev, dtype)
    routine = LayerAgnosticExperts(gate_up, down, fused=fused, kernels="triton")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 16, generator=g)
    ids = torch.randint(-1, 6, (9, 2), generator=g)
    ids[0] = -1
    weights = torch.rand(9, 2, generator=g)
    tol = 3e-2 if cuda else 1e-4
    for layer in range(5):
        expected = part.compute(layer, hidden, ids, weights)
        got = routine(layer, hidden.to(dev, dtype), ids.to(dev), weights.to(dev)).float().cpu()
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))
        assert torch.equal(got[0], torch.zeros(16))
