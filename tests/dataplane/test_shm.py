"""Shared-memory data plane: region lifecycle, tensor round trips, reference validation, write-back."""

from __future__ import annotations

import os

import pytest
import torch

from asap.dataplane.shm import ShmAttachments, ShmRegion, SlotAllocator, region_name, shm_tensor
from asap.errors import InvalidArgument
from asap.v1 import common_pb2, expert_pb2
from asap.wire.chunks import decode_dispatch, dispatch_chunks
from asap.wire.codec import SUPPORTED_DTYPES, decode_tensor, encode_tensor


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("asap_")}


@pytest.fixture
def region() -> ShmRegion:
    r = ShmRegion.create(region_name(0, 0), 1 << 16)
    yield r
    r.destroy()


def test_region_lifecycle_leaves_no_segment() -> None:
    before = _segments()
    r = ShmRegion.create(region_name(3, 4), 4096)
    assert r.name in _segments()
    other = ShmRegion.attach(r.name)
    assert other.size >= 4096 and not other.owner
    other.close()
    other.close()  # idempotent
    other.unlink()  # not the owner: no-op
    assert r.name in _segments()
    r.unlink()
    assert r.name not in _segments()
    r.unlink()
    r.close()
    r.close()
    r.destroy()
    assert r.closed
    assert _segments() == before
    with pytest.raises(InvalidArgument):
        ShmRegion.attach(r.name)


def test_bad_names_are_rejected() -> None:
    with pytest.raises(InvalidArgument):
        ShmRegion.create("../etc/passwd", 4096)
    with pytest.raises(InvalidArgument):
        ShmRegion.attach("not-ours")


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_round_trip_every_dtype(region: ShmRegion, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(7, 5, generator=g) * 100).to(dtype)
    view = t[:, 1:4]  # strided rows
    msg = shm_tensor(view, region, 128)
    assert not msg.data and msg.shm.nbytes == view.numel() * dtype.itemsize
    attachments = ShmAttachments()
    try:
        out = decode_tensor(msg, dtype=dtype, shape=(7, 3), refs=attachments.decode)
        assert out.dtype == dtype and torch.equal(out, view)
        assert torch.equal(region.view(128, dtype, [7, 3]), view)
        assert attachments.bytes_read == view.numel() * dtype.itemsize
    finally:
        attachments.close()


def _ref(region: str, offset: int, nbytes: int, shape: list[int]) -> common_pb2.Tensor:
    return common_pb2.Tensor(
        dtype=common_pb2.FLOAT32,
        shape=shape,
        shm=common_pb2.RegionRef(region=region, offset=offset, nbytes=nbytes),
    )


def test_bad_references_are_invalid_argument(region: ShmRegion) -> None:
    attachments = ShmAttachments()
    try:
        good = _ref(region.name, 0, 2 * 4 * 4, [2, 4])
        assert decode_tensor(good, refs=attachments.decode).shape == (2, 4)
        bad = [
            _ref(region.name, 0, 31, [2, 4]),  # nbytes != prod(shape) * itemsize
            _ref(region.name, region.size - 16, 32, [2, 4]),  # out of bounds
            _ref(region.name, 2**63, 32, [2, 4]),  # far out of bounds
            _ref("asap_no_such_region", 0, 32, [2, 4]),  # unknown
            _ref("../../x", 0, 32, [2, 4]),  # bad name
            _ref(region.name, 2, 32, [2, 4]),  # misaligned
        ]
        inline = _ref(region.name, 0, 32, [2, 4])
        inline.data = b"\0" * 32
        bad.append(inline)
        for msg in bad:
            with pytest.raises(InvalidArgument):
                decode_tensor(msg, refs=attachments.decode)
        with pytest.raises(InvalidArgument, match="only with the shm data plane"):
            decode_tensor(good)  # the receiver did not enable shared memory
    finally:
        attachments.close()


def test_dispatch_through_shm_and_only_hidden_accepted(region: ShmRegion) -> None:
    slots = SlotAllocator(region.size)
    hidden = torch.randn(10, 8)
    ids = torch.zeros(10, 2, dtype=torch.int32)
    weights = torch.ones(10, 2)

    def place(rows: torch.Tensor) -> common_pb2.Tensor | None:
        offset = slots.alloc(rows.numel() * rows.element_size())
        return None if offset is None else shm_tensor(rows, region, offset)

    chunks = dispatch_chunks(
        micro_batch=1, layer=0, attention_rank=0, hidden=hidden, expert_ids=ids, weights=weights,
        max_chunk_bytes=4096, place_hidden=place,
    )  # fmt: skip
    attachments = ShmAttachments()
    try:
        kw = {"hidden_size": 8, "dtype": torch.float32, "num_layers": 1, "num_experts": 4, "top_k": 2}
        for chunk in chunks:
            assert chunk.hidden.HasField("shm") and not chunk.hidden.data
            d = decode_dispatch(chunk, refs=attachments.decode, **kw)  # type: ignore[arg-type]
            assert torch.equal(d.hidden, hidden[d.row_offset : d.row_offset + d.rows])
            with pytest.raises(InvalidArgument):
                decode_dispatch(chunk, **kw)  # type: ignore[arg-type]
        # a reference is accepted for the hidden rows only
        bad = expert_pb2.DispatchChunk()
        bad.CopyFrom(chunks[0])
        bad.weights.CopyFrom(shm_tensor(weights[: chunks[0].hidden.shape[0]], region, 8192))
        with pytest.raises(InvalidArgument):
            decode_dispatch(bad, refs=attachments.decode, **kw)  # type: ignore[arg-type]
    finally:
        attachments.close()


def test_slot_allocator_first_fit_and_full() -> None:
    slots = SlotAllocator(256)
    a = slots.alloc(1)
    b = slots.alloc(64)
    c = slots.alloc(100)
    assert (a, b, c) == (0, 64, 128)
    assert slots.alloc(1) is None  # full: the caller falls back to inline bytes
    slots.free(b)
    assert slots.alloc(10) == 64
    slots.free(a)
    slots.free(a)  # idempotent
    assert slots.in_use == 64 + 128


def test_inline_bytes_still_decode_without_shm() -> None:
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_results_are_written_back_over_the_rows(region: ShmRegion) -> None:
    rows = torch.randn(5, 4)
    msg = shm_tensor(rows, region, 128)
    attachments = ShmAttachments()
    try:
        got = attachments.decode(msg, [5, 4], "rows")
        assert torch.equal(got, rows)
        answer = attachments.write_back(msg, got * 2)
        assert answer.shm.offset == 128 and answer.shm.region == region.name and not answer.data
        assert torch.equal(region.view(128, torch.float32, [5, 4]), rows * 2)
        with pytest.raises(InvalidArgument, match="bytes"):
            attachments.write_back(msg, torch.zeros(6, 4))
    finally:
        attachments.close()
