"""Triton kernels for the memory-bound steps of the grouped expert routine (``asap.model.grouped``).

Import this module only where Triton is installed (``grouped.triton_available`` checks); the rest of the
package never imports it at module level. Every kernel reads the number of valid sorted rows (the last
group offset) from device memory and leaves rows past it alone, so the static row count a CUDA graph
needs costs nothing for rows routed to other ranks or padding:

* ``gather_rows``: ``x[j] = hidden[order[j] // K]`` for the valid sorted rows, and the inverse permutation
  ``inverse[order[j]] = j`` on the way (one read of each token row per slot, one write);
* ``silu_mul``: ``act = silu(gate) * up`` in float32 from the first grouped GEMM's output, one pass;
* ``combine``: per token, the float32 sum of ``weight * y[inverse[slot]]`` over its valid slots, each ``y``
  row read once and each output row written once (no atomics, no float32 intermediate in memory); given
  a device count, only the tokens below it are written, into a caller's tensor (the GPU fast lane's step
  writes its results over the slot's rows that way, leaving the rest as they were).
"""

# Triton is untyped (and absent where mypy runs in CI); its kernels are typed by Triton itself.
# mypy: disable-error-code="import-not-found,import-untyped,untyped-decorator,no-untyped-def,no-any-return"

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    hidden_ptr,
    order_ptr,
    count_ptr,
    x_ptr,
    inverse_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    count = tl.load(count_ptr)
    if row < count:
        slot = tl.load(order_ptr + row)
        tl.store(inverse_ptr + slot, row.to(tl.int64))
        src = hidden_ptr + (slot // K) * H
        dst = x_ptr + row.to(tl.int64) * H
        for start in tl.static_range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            mask = cols < H
            tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


@triton.jit
def _silu_mul_kernel(h_ptr, count_ptr, act_ptr, INTER: tl.constexpr, BLOCK_I: tl.constexpr):
    row = tl.program_id(0)
    count = tl.load(count_ptr)
    if row < count:
        src = h_ptr + row.to(tl.int64) * (2 * INTER)
        dst = act_ptr + row.to(tl.int64) * INTER
        for start in tl.static_range(0, INTER, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            mask = cols < INTER
            gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(src + INTER + cols, mask=mask, other=0.0).to(tl.float32)
            act = gate / (1.0 + tl.exp(-gate)) * up
            tl.store(dst + cols, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr,
    ids_ptr,
    weights_ptr,
    inverse_ptr,
    out_ptr,
    count_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    if HAS_COUNT:
        if token < tl.load(count_ptr):
            _combine_token(y_ptr, ids_ptr, weights_ptr, inverse_ptr, out_ptr, token, H, K, BLOCK_H)
    else:
        _combine_token(y_ptr, ids_ptr, weights_ptr, inverse_ptr, out_ptr, token, H, K, BLOCK_H)


@triton.jit
def _combine_token(
    y_ptr,
    ids_ptr,
    weights_ptr,
    inverse_ptr,
    out_ptr,
    token,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    for start in tl.static_range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(K):
            slot = token * K + k
            valid = tl.load(ids_ptr + slot) >= 0
            if valid:
                row = tl.load(inverse_ptr + slot)
                w = tl.load(weights_ptr + slot).to(tl.float32)
                y = tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
                acc += w * y
        tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(n), cap)


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


def gather_rows(
    hidden: torch.Tensor, order: torch.Tensor, count: torch.Tensor, top_k: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H]; order [N*K] slot of each sorted row; count 1-element device tensor of valid sorted
    rows; rows: rows to allocate (at least N*K) -> (x [rows, H] sorted rows, only the valid ones written;
    inverse [N*K] sorted position of each valid slot)."""
    slots, h = order.numel(), hidden.shape[1]
    x = torch.empty(max(slots, rows or 0), h, dtype=hidden.dtype, device=hidden.device)
    inverse = torch.empty(slots, dtype=torch.int64, device=hidden.device)
    block = _block(h, 2048)
    _gather_rows_kernel[(slots,)](
        hidden, order, count, x, inverse, H=h, K=top_k, BLOCK_H=block, num_warps=_warps(block)
    )
    return x, inverse


def silu_mul(h1: torch.Tensor, count: torch.Tensor, max_count: int | None = None) -> torch.Tensor:
    """h1 [M, 2I] (gate | up) -> silu(gate) * up [M, I], computed in float32, valid rows only; max_count
    bounds the valid count (programs launched; default M)."""
    rows, inter = h1.shape[0], h1.shape[1] // 2
    act = torch.empty(rows, inter, dtype=h1.dtype, device=h1.device)
    block = _block(inter, 1024)
    _silu_mul_kernel[(min(rows, max_count or rows),)](
        h1, count, act, INTER=inter, BLOCK_I=block, num_warps=_warps(block)
    )
    return act


def combine(
    y: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    inverse: torch.Tensor,
    out: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [N*K, H] sorted expert outputs; ids [N, K] (-1 = skip); weights [N, K]; inverse [N*K]
    -> [N, H]: per token, sum over valid slots of weight * y row, accumulated in float32. ``out``: write
    there ([N, H] contiguous, y's dtype) instead of a new tensor; ``count`` (1-element device tensor):
    write only tokens below it, the other rows of ``out`` left as they were."""
    n, k = ids.shape
    h = y.shape[1]
    if out is None:
        out = torch.empty(n, h, dtype=y.dtype, device=y.device)
    block = _block(h, 2048)
    _combine_kernel[(n,)](
        y,
        ids,
        weights,
        inverse,
        out,
        out if count is None else count,  # (not read without a count)
        H=h,
        K=k,
        BLOCK_H=block,
        HAS_COUNT=count is not None,
        num_warps=_warps(block),
    )
    return out
