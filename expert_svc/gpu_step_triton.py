"""Triton kernels of the GPU fast lane's captured step (``expert_svc.gpu_graph``): its checks and masks in
one kernel, its done flag in another.

The step of a slot checks the slot's words on the device (row count in the graph's bucket, layer in its
window, request flag holding the words' sequence number), masks the rows past the count, translates the
expert ids to this rank's local indices and counts the ids not hosted here. Written with torch ops that
is ~20 kernels of a few elements each, which cost ~65-90 µs per step on an H200 (each a launch inside the
graph), as much as half the routine at 1k tokens. ``prologue`` does all of it in one pass over the
dispatch's ids and weights; the routine then writes its results straight over the slot's valid rows
(``grouped_triton.combine`` with the count), and ``publish_done`` writes the done flag only when the step
computed.

Import only where Triton is installed (``asap.model.grouped.triton_available``).
"""

# Triton is untyped (and absent where mypy runs in CI); its kernels are typed by Triton itself.
# mypy: disable-error-code="import-not-found,import-untyped,untyped-decorator,no-untyped-def,no-any-return"

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["prologue", "publish_done"]

_BLOCK = 1024
"""(row, k) entries per program of the prologue."""


@triton.jit
def _prologue_kernel(
    words_ptr,
    flag_ptr,
    table_ptr,
    lut_ptr,
    ids_ptr,
    weights_ptr,
    local_ptr,
    kept_ptr,
    inner_ptr,
    count_ptr,
    bad_ptr,
    top,
    experts,
    below,
    bucket,
    window,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.load(words_ptr).to(tl.int64)
    layer = tl.load(words_ptr + 1).to(tl.int64)
    match = tl.load(flag_ptr) == tl.load(words_ptr + 2)
    at = tl.where((layer >= 0) & (layer < top), layer, top)  # the table's last row: any layer out of range
    match = match & (rows > below) & (rows <= bucket) & (tl.load(table_ptr + 2 * at) == window)
    count = tl.where(match, rows, 0)
    if tl.program_id(0) == 0:
        tl.store(inner_ptr, tl.where(match, tl.load(table_ptr + 2 * at + 1), 0))
        tl.store(count_ptr, count)
    entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = entry < bucket * K
    valid = inside & (entry // K < count)
    ids = tl.load(ids_ptr + entry, mask=valid, other=-1).to(tl.int64)
    # the lookup of ``ExpertPart.device_lut``: index 0 for id -1, 1 + e for expert e, experts + 1 for an id
    # >= experts, experts + 2 for an id < -1; -2 marks the ids not hosted here
    at_lut = tl.minimum(ids + 1, experts + 1)
    at_lut = tl.where(at_lut < 0, experts + 2, at_lut)
    local = tl.load(lut_ptr + at_lut, mask=inside, other=-1)
    bad = local == -2
    tl.store(local_ptr + entry, tl.where(bad, -1, local), mask=inside)
    tl.store(kept_ptr + entry, tl.load(weights_ptr + entry, mask=valid, other=0.0), mask=inside)
    seen = tl.sum(bad.to(tl.int64), axis=0)
    if seen > 0:
        tl.atomic_add(bad_ptr, seen)


@triton.jit
def _publish_done_kernel(count_ptr, flag_ptr, done_ptr):
    if tl.load(count_ptr) > 0:
        tl.store(done_ptr, tl.load(flag_ptr))


def prologue(
    words: torch.Tensor,
    flag: torch.Tensor,
    table: torch.Tensor,
    lut: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    below: int,
    window: int,
    bad_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's checks in one kernel. ``words`` int32 [3] (rows, layer, seq) and ``flag`` int32 [1] of
    the slot; ``table`` int64 [top + 1, 2] (window, layer within it) per layer id, the last row for layers
    out of range; ``lut`` int64 (``ExpertPart.device_lut``); ``ids`` int32 and ``weights`` float32
    [bucket, K] views of the slot. The dispatch counts if its row count is in (``below``, bucket], its
    layer in ``window`` and the flag holds its seq; then rows past the count are masked, else all are.
    Returns (local ids int64 [bucket, K], -1 to skip; weights float32 [bucket, K], 0 where masked; the
    layer within the window, int64 0-d; the rows to compute, int64 [1], 0 for a no-op). The ids neither -1
    nor hosted here are skipped and added to ``bad_ids`` (int64, on the device)."""
    bucket, k = ids.shape
    local = torch.empty(bucket, k, dtype=torch.int64, device=ids.device)
    kept = torch.empty(bucket, k, dtype=torch.float32, device=ids.device)
    inner = torch.empty((), dtype=torch.int64, device=ids.device)
    count = torch.empty(1, dtype=torch.int64, device=ids.device)
    _prologue_kernel[(triton.cdiv(bucket * k, _BLOCK),)](
        words,
        flag,
        table,
        lut,
        ids,
        weights,
        local,
        kept,
        inner,
        count,
        bad_ids,
        table.shape[0] - 1,
        lut.shape[0] - 3,
        below,
        bucket,
        window,
        K=k,
        BLOCK=_BLOCK,
        num_warps=4,
    )
    return local, kept, inner, count


def publish_done(count: torch.Tensor, flag: torch.Tensor, done: torch.Tensor) -> None:
    """``done[0] = flag[0]`` if the step computed (``count`` > 0), on the device: the peer's copy out of
    the results waits for it."""
    _publish_done_kernel[(1,)](count, flag, done, num_warps=1)
