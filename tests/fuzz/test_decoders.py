"""Every decoder of untrusted input, fuzzed: whatever it is given, it returns a value or raises
``InvalidArgument`` (a status code on the wire), never anything else.

Covered: tensors (inline, shape-only, region references), dispatch chunks (structured and raw bytes),
combine chunks into an assembler, wire errors, and the fast plane's region header (geometry),
descriptors (requests, completions), slot headers and error texts.
"""

from __future__ import annotations

import contextlib
import struct

import torch
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from asap.dataplane import fastlink
from asap.dataplane.refs import checked_ref
from asap.errors import AsapError, InvalidArgument
from asap.rpc.status import error_from_wire
from asap.v1 import common_pb2, expert_pb2
from asap.wire.chunks import CombineAssembler, decode_dispatch
from asap.wire.codec import decode_tensor
from tests.fuzz.conftest import CASES, FUZZ

HIDDEN, LAYERS, EXPERTS, TOP_K = 16, 3, 8, 2

dims = st.lists(st.integers(-2, 40), max_size=3)
small_dims = st.lists(st.integers(0, 8), min_size=2, max_size=2)
wire_dtypes = st.integers(-1, 12)
region_refs = st.builds(
    common_pb2.RegionRef,
    region=st.text(max_size=40),
    offset=st.integers(0, 2**63 - 1),
    nbytes=st.integers(0, 2**63 - 1),
)


@st.composite
def tensors(draw: st.DrawFn, shape: st.SearchStrategy[list[int]] = dims) -> common_pb2.Tensor:
    msg = common_pb2.Tensor(dtype=draw(wire_dtypes), shape=draw(shape), data=draw(st.binary(max_size=600)))
    msg.shape_only = draw(st.booleans()) and not draw(st.booleans())
    where = draw(st.sampled_from(["", "", "shm", "cuda_ipc"]))
    if where:
        getattr(msg, where).CopyFrom(draw(region_refs))
    return msg


@st.composite
def dispatch_chunks(draw: st.DrawFn) -> expert_pb2.DispatchChunk:
    msg = expert_pb2.DispatchChunk(
        micro_batch=draw(st.integers(0, 2**64 - 1)),
        layer=draw(st.integers(0, 2**32 - 1) | st.integers(0, LAYERS)),
        row_offset=draw(st.integers(0, 2**32 - 1) | st.integers(0, 8)),
        total_rows=draw(st.integers(0, 2**32 - 1) | st.integers(0, 8)),
        step=draw(st.integers(0, 2**64 - 1)),
        sync_participants=draw(st.integers(0, 2**32 - 1) | st.integers(0, 3)),
        attention_rank=draw(st.integers(0, 2**32 - 1)),
    )
    msg.hidden.CopyFrom(draw(tensors(small_dims)))
    msg.expert_ids.CopyFrom(draw(tensors(small_dims)))
    msg.weights.CopyFrom(draw(tensors(small_dims)))
    return msg


def _decode(msg: expert_pb2.DispatchChunk) -> None:
    decode_dispatch(
        msg, hidden_size=HIDDEN, dtype=torch.float32, num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K
    )


@FUZZ
@given(tensors(), st.booleans())
def test_decode_tensor_returns_a_tensor_or_invalid_argument(msg: common_pb2.Tensor, shape_only: bool) -> None:
    CASES["decoder: tensor"] += 1
    try:
        out = decode_tensor(msg, allow_shape_only=shape_only)
    except InvalidArgument:
        return
    assert list(out.shape) == list(msg.shape)


@FUZZ
@given(dispatch_chunks())
def test_decode_dispatch_of_structured_garbage(msg: expert_pb2.DispatchChunk) -> None:
    CASES["decoder: dispatch chunk"] += 1
    with contextlib.suppress(InvalidArgument):
        _decode(msg)


@FUZZ
@given(st.binary(max_size=400))
def test_decode_dispatch_of_raw_bytes(raw: bytes) -> None:
    CASES["decoder: dispatch chunk bytes"] += 1
    try:
        msg = expert_pb2.DispatchChunk.FromString(raw)
    except DecodeError:  # grpc answers INTERNAL before any ASAP code runs
        return
    with contextlib.suppress(InvalidArgument):
        _decode(msg)


@FUZZ
@given(
    st.integers(0, 6),
    st.lists(st.tuples(st.integers(0, 8), tensors(small_dims), st.text(max_size=8)), max_size=4),
)
def test_combine_assembler_takes_parts_or_refuses_them(
    total: int, parts: list[tuple[int, common_pb2.Tensor, str]]
) -> None:
    CASES["decoder: combine chunk"] += 1
    assembler = CombineAssembler(total, HIDDEN, torch.float32, micro_batch=1, layer=0)
    for offset, hidden, code in parts:
        msg = expert_pb2.CombineChunk(micro_batch=1, layer=0, row_offset=offset, total_rows=total)
        msg.hidden.CopyFrom(hidden)
        if code:
            msg.error.CopyFrom(common_pb2.Error(code=code, message="x"))
        # an error part raises its own (typed) error; a malformed one InvalidArgument
        with contextlib.suppress(AsapError):
            assembler.add(msg)
    if assembler.complete:
        assert list(assembler.result().shape) == [total, HIDDEN]


@FUZZ
@given(st.text(max_size=30), st.text(max_size=60))
def test_wire_errors_always_become_typed_errors(code: str, message: str) -> None:
    CASES["decoder: wire error"] += 1
    assert isinstance(error_from_wire(common_pb2.Error(code=code, message=message)), AsapError)


@FUZZ
@given(tensors(small_dims), st.integers(0, 4096))
def test_region_references_are_checked_against_the_region(msg: common_pb2.Tensor, size: int) -> None:
    CASES["decoder: region reference"] += 1
    try:
        ref, _ = checked_ref(msg, "shm", size, list(msg.shape), "hidden")
    except InvalidArgument:
        return
    assert ref.offset + ref.nbytes <= size


@FUZZ
@given(st.binary(min_size=0, max_size=128))
def test_fast_link_geometry_of_garbage(raw: bytes) -> None:
    CASES["decoder: fast link geometry"] += 1
    buf = memoryview(bytearray(raw.ljust(8192, b"\0") if len(raw) > 64 else raw))
    try:
        geometry = fastlink.LinkGeometry.read(buf)
    except InvalidArgument:
        return
    assert geometry.nbytes <= len(buf)


_GEOMETRY = fastlink.LinkGeometry(slots=4, slot_bytes=65 * 4096, hidden_size=HIDDEN, top_k=TOP_K, itemsize=4)


@FUZZ
@given(
    st.binary(min_size=struct.calcsize("<QIIIIQQQI"), max_size=struct.calcsize("<QIIIIQQQI")),
    st.binary(max_size=1024),
)
def test_fast_descriptors_and_slot_headers_of_garbage(raw: bytes, header: bytes) -> None:
    CASES["decoder: fast descriptor + slot header"] += 1
    request = fastlink.Request.unpack(raw)
    try:
        request.check(_GEOMETRY)
    except InvalidArgument:
        return
    slot = bytearray(header.ljust(fastlink.SLOT_HEADER_BYTES, b"\0"))
    with contextlib.suppress(InvalidArgument):
        fastlink.SlotHeader.read(memoryview(slot), 0, request)
    assert isinstance(fastlink.read_error(memoryview(slot), 0), str)


@FUZZ
@given(
    st.binary(min_size=struct.calcsize("<QIIIIQQQQ"), max_size=struct.calcsize("<QIIIIQQQQ")),
    st.text(max_size=20),
)
def test_fast_completions_of_garbage_map_to_typed_errors(raw: bytes, message: str) -> None:
    CASES["decoder: fast completion"] += 1
    completion = fastlink.Completion.unpack(raw)
    error = fastlink.error_of(completion.status, message) if completion.status else None
    assert error is None or isinstance(error, AsapError)
