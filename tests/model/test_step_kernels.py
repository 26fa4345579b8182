"""The GPU fast lane's fused step kernels (``expert_svc.gpu_step_triton``) and the in-place combine
(``grouped_triton.combine`` with a count), against plain reference code: on CUDA where there is one, else
on CPU tensors through Triton's interpreter (``triton_device``)."""

from __future__ import annotations

import pytest
import torch

E, K, BUCKET, BELOW = 6, 3, 16, 8
HOSTED = (0, 2, 4)  # local 0, 1, 2; the odd ids are another rank's
WINDOW_OF = {1: (0, 0), 3: (0, 1), 4: (1, 0)}  # MoE layer id -> (window, layer within it)


def _lut(dev: torch.device) -> torch.Tensor:
    """``ExpertPart.device_lut`` of a part hosting ``HOSTED`` of ``E`` experts."""
    local = {e: i for i, e in enumerate(HOSTED)}
    return torch.tensor([-1, *(local.get(e, -2) for e in range(E)), -2, -2], dtype=torch.int64, device=dev)


def _table(dev: torch.device) -> torch.Tensor:
    """``StepGraphs``' table: (window, layer within it) per layer id, -1 for others, one row past the end."""
    top = max(WINDOW_OF) + 1
    table = torch.full((top + 1, 2), -1, dtype=torch.int64)
    for layer, (window, inner) in WINDOW_OF.items():
        table[layer] = torch.tensor([window, inner])
    return table.to(dev)


def _expected(
    words: tuple[int, int, int], flag: int, window: int, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(local, kept, inner, count, bad ids) as the step's torch ops define them."""
    rows, layer, seq = words
    entry = WINDOW_OF.get(layer, (-1, -1))
    match = flag == seq and BELOW < rows <= BUCKET and entry[0] == window
    count = rows if match else 0
    local = torch.full((BUCKET, K), -1, dtype=torch.int64)
    bad = 0
    for r in range(count):
        for k in range(K):
            e = int(ids[r, k])
            if e == -1:
                continue
            if e in HOSTED:
                local[r, k] = HOSTED.index(e)
            else:
                bad += 1
    kept = torch.where(torch.arange(BUCKET)[:, None] < count, weights, 0.0)
    return local, kept, entry[1] if match else 0, count, bad


CASES = [
    pytest.param((12, 3, 7), 7, 0, id="computes"),
    pytest.param((16, 4, 7), 7, 1, id="computes-full-bucket-other-window"),
    pytest.param((12, 3, 7), 8, 0, id="flag-not-the-seq"),
    pytest.param((8, 3, 7), 7, 0, id="rows-of-the-bucket-below"),
    pytest.param((17, 3, 7), 7, 0, id="rows-past-the-bucket"),
    pytest.param((12, 4, 7), 7, 0, id="layer-of-another-window"),
    pytest.param((12, 2, 7), 7, 0, id="not-a-moe-layer"),
    pytest.param((12, 999, 7), 7, 0, id="layer-out-of-range"),
    pytest.param((12, -5, 7), 7, 0, id="negative-layer"),
]


@pytest.mark.parametrize(("words", "flag", "window"), CASES)
def test_prologue_matches_the_torch_step(
    triton_device: torch.device, words: tuple[int, int, int], flag: int, window: int
) -> None:
    from expert_svc import gpu_step_triton as kernels

    dev = triton_device
    g = torch.Generator().manual_seed(sum(words) + flag)
    ids = torch.randint(-3, E + 2, (BUCKET, K), generator=g, dtype=torch.int32)  # < -1 and >= E too
    weights = torch.rand(BUCKET, K, generator=g)
    bad_ids = torch.full((), 5, dtype=torch.int64, device=dev)  # counts on from where it was
    local, kept, inner, count = kernels.prologue(
        torch.tensor(words, dtype=torch.int32, device=dev),
        torch.tensor([flag], dtype=torch.int32, device=dev),
        _table(dev),
        _lut(dev),
        ids.to(dev),
        weights.to(dev),
        below=BELOW,
        window=window,
        bad_ids=bad_ids,
    )
    want_local, want_kept, want_inner, want_count, want_bad = _expected(words, flag, window, ids, weights)
    assert int(count) == want_count
    assert int(inner) == want_inner
    assert torch.equal(local.cpu(), want_local)
    assert torch.equal(kept.cpu(), want_kept)
    assert int(bad_ids) == 5 + want_bad  # garbage past the count never counts


def test_publish_done_only_when_the_step_computed(triton_device: torch.device) -> None:
    from expert_svc import gpu_step_triton as kernels

    dev = triton_device
    flag = torch.tensor([41], dtype=torch.int32, device=dev)
    done = torch.tensor([40], dtype=torch.int32, device=dev)
    kernels.publish_done(torch.tensor([0], dtype=torch.int64, device=dev), flag, done)
    assert int(done) == 40
    kernels.publish_done(torch.tensor([3], dtype=torch.int64, device=dev), flag, done)
    assert int(done) == 41


def test_combine_in_place_writes_only_the_rows_below_the_count(triton_device: torch.device) -> None:
    from asap.model import grouped_triton as kernels

    dev = triton_device
    g = torch.Generator().manual_seed(4)
    n, k, h = 9, 3, 20
    ids = torch.randint(-1, 4, (n, k), generator=g).to(dev)
    weights = torch.rand(n, k, generator=g).to(dev)
    inverse = torch.randperm(n * k, generator=g).to(dev)
    y = torch.randn(n * k, h, generator=g).to(dev)
    whole = kernels.combine(y, ids, weights, inverse)
    target = torch.full((n, h), 7.0, device=dev)
    got = kernels.combine(y, ids, weights, inverse, target, torch.tensor([5], dtype=torch.int64, device=dev))
    assert got.data_ptr() == target.data_ptr()
    assert torch.equal(target[:5], whole[:5])
    assert torch.equal(target[5:].cpu(), torch.full((n - 5, h), 7.0))
    kernels.combine(y, ids, weights, inverse, target, torch.tensor([0], dtype=torch.int64, device=dev))
    assert torch.equal(target[5:].cpu(), torch.full((n - 5, h), 7.0))  # a count of 0 writes nothing
