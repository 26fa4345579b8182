"""Dispatch/combine chunks: splitting, header validation, and reassembly of the answers."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asap.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from asap.syncstep import SyncStep
from asap.v1 import common_pb2, expert_pb2
from asap.wire.chunks import (
    HEADER_ALLOWANCE,
    CombineAssembler,
    Dispatch,
    combine_chunk,
    decode_dispatch,
    dispatch_chunks,
    error_combine,
)
from asap.wire.codec import encode_tensor

SETTINGS = settings(max_examples=100, deadline=None)
MODEL = {"hidden_size": 8, "dtype": torch.bfloat16, "num_layers": 4, "num_experts": 16, "top_k": 4}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def routed(rows: int, hidden: int, k: int, experts: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)  # [n, H]
    ids = torch.randint(-1, experts, (rows, k), generator=gen)  # [n, K] int64 as topk returns
    weights = torch.rand(rows, k, generator=gen)  # [n, K]
    return h, ids, weights


def decode_all(chunks: list[expert_pb2.DispatchChunk], **model: object) -> list[Dispatch]:
    return [
        decode_dispatch(expert_pb2.DispatchChunk.FromString(c.SerializeToString()), **model) for c in chunks
    ]  # type: ignore[arg-type]


@SETTINGS
@given(
    rows=st.integers(1, 300),
    hidden=st.integers(1, 96),
    k=st.integers(1, 8),
    max_chunk_bytes=st.integers(64, 64 * 1024),
    seed=st.integers(0, 1000),
)
def test_split_and_reassemble_round_trip(
    rows: int, hidden: int, k: int, max_chunk_bytes: int, seed: int
) -> None:
    h, ids, weights = routed(rows, hidden, k, seed=seed)
    chunks = dispatch_chunks(
        micro_batch=7,
        layer=3,
        attention_rank=2,
        hidden=h,
        expert_ids=ids,
        weights=weights,
        traceparent=TRACEPARENT,
        tracestate="asap=1",
        max_chunk_bytes=max_chunk_bytes,
    )
    model = {**MODEL, "hidden_size": hidden, "top_k": k}
    dispatches = decode_all(chunks, **model)
    assert sum(d.rows for d in dispatches) == rows
    row_bytes = hidden * 2 + k * 8
    for chunk, d in zip(chunks, dispatches, strict=True):
        assert chunk.ByteSize() <= max_chunk_bytes or d.rows == 1
        assert chunk.ByteSize() <= max(max_chunk_bytes, row_bytes + HEADER_ALLOWANCE + len(TRACEPARENT) + 6)
        assert (d.micro_batch, d.layer, d.attention_rank, d.total_rows) == (7, 3, 2, rows)
        assert (d.traceparent, d.tracestate) == (TRACEPARENT, "asap=1")
        assert d.sent_unix_nanos > 0
        end = d.row_offset + d.rows
        assert torch.equal(d.hidden.view(torch.int16), h[d.row_offset : end].view(torch.int16))
        assert torch.equal(d.expert_ids, ids[d.row_offset : end].to(torch.int32))
        assert torch.equal(d.weights, weights[d.row_offset : end])
    # the expert rank echoes the rows; answers arrive in any order
    assembler = CombineAssembler(rows, hidden, torch.bfloat16, micro_batch=7, layer=3)
    answers = [combine_chunk(d, d.hidden, queue_nanos=5, compute_nanos=9) for d in dispatches]
    random.Random(seed).shuffle(answers)
    done = [assembler.add(expert_pb2.CombineChunk.FromString(a.SerializeToString())) for a in answers]
    assert done == [False] * (len(answers) - 1) + [True]
    assert torch.equal(assembler.result().view(torch.int16), h.view(torch.int16))


def test_chunks_are_contiguous_and_ordered() -> None:
    h, ids, weights = routed(1000, 64, 4)
    chunks = dispatch_chunks(
        micro_batch=1,
        layer=0,
        attention_rank=0,
        hidden=h,
        expert_ids=ids,
        weights=weights,
        max_chunk_bytes=16384,
    )
    assert len(chunks) > 1
    offsets = [c.row_offset for c in chunks]
    sizes = [c.hidden.shape[0] for c in chunks]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    assert len(set(sizes[:-1])) == 1  # equal chunks, the last one takes the rest


@pytest.mark.parametrize(
    ("hidden", "ids", "weights"),
    [
        (torch.zeros(0, 8), torch.zeros(0, 2), torch.zeros(0, 2)),
        (torch.zeros(8), torch.zeros(1, 2), torch.zeros(1, 2)),
        (torch.zeros(3, 8), torch.zeros(2, 2), torch.zeros(2, 2)),
        (torch.zeros(3, 8), torch.zeros(3, 2), torch.zeros(3, 3)),
    ],
)
def test_dispatch_chunks_rejects_inconsistent_inputs(
    hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> None:
    with pytest.raises(InvalidArgument):
        dispatch_chunks(
            micro_batch=0, layer=0, attention_rank=0, hidden=hidden, expert_ids=ids, weights=weights
        )


def valid_chunk() -> expert_pb2.DispatchChunk:
    h, ids, weights = routed(4, 8, 2)
    (chunk,) = dispatch_chunks(
        micro_batch=1, layer=1, attention_rank=0, hidden=h, expert_ids=ids, weights=weights
    )
    chunk.row_offset, chunk.total_rows = 2, 10
    return chunk


def set_tensor(field: str, t: torch.Tensor) -> Callable[[expert_pb2.DispatchChunk], None]:
    def mutate(chunk: expert_pb2.DispatchChunk) -> None:
        getattr(chunk, field).CopyFrom(encode_tensor(t))

    return mutate


def set_attr(field: str, value: int) -> Callable[[expert_pb2.DispatchChunk], None]:
    def mutate(chunk: expert_pb2.DispatchChunk) -> None:
        setattr(chunk, field, value)

    return mutate


def corrupt_payload(chunk: expert_pb2.DispatchChunk) -> None:
    chunk.hidden.data = chunk.hidden.data[:-2]


def clear_hidden(chunk: expert_pb2.DispatchChunk) -> None:
    chunk.ClearField("hidden")


MALFORMED = {
    "layer == num_layers": (set_attr("layer", 4), "layer 4 out of range"),
    "layer huge": (set_attr("layer", 2**32 - 1), "out of range"),
    "rows past total_rows": (set_attr("total_rows", 5), "exceed total_rows 5"),
    "row_offset huge": (set_attr("row_offset", 2**32 - 1), "exceed total_rows"),
    "no rows": (set_tensor("hidden", torch.zeros(0, 8, dtype=torch.bfloat16)), "at least one row"),
    "hidden missing": (clear_hidden, "2-D"),
    "hidden 3-D": (set_tensor("hidden", torch.zeros(4, 8, 1, dtype=torch.bfloat16)), "2-D"),
    "hidden cols != hidden_size": (set_tensor("hidden", torch.zeros(4, 9, dtype=torch.bfloat16)), "hidden"),
    "hidden dtype": (set_tensor("hidden", torch.zeros(4, 8, dtype=torch.float32)), "hidden: dtype"),
    "hidden payload short": (corrupt_payload, "data bytes"),
    "ids rows != hidden rows": (set_tensor("expert_ids", torch.zeros(3, 2, dtype=torch.int32)), "expert_ids"),
    "ids cols > top_k": (set_tensor("expert_ids", torch.zeros(4, 5, dtype=torch.int32)), "top_k"),
    "ids no cols": (set_tensor("expert_ids", torch.zeros(4, 0, dtype=torch.int32)), "top_k"),
    "ids int64": (set_tensor("expert_ids", torch.zeros(4, 2, dtype=torch.int64)), "expert_ids: dtype"),
    "ids 1-D": (set_tensor("expert_ids", torch.zeros(4, dtype=torch.int32)), "2-D"),
    "id == num_experts": (set_tensor("expert_ids", torch.full((4, 2), 16, dtype=torch.int32)), "span"),
    "id < -1": (set_tensor("expert_ids", torch.full((4, 2), -2, dtype=torch.int32)), "span"),
    "weights cols != ids cols": (set_tensor("weights", torch.zeros(4, 3)), "weights"),
    "weights rows": (set_tensor("weights", torch.zeros(5, 2)), "weights"),
    "weights bf16": (set_tensor("weights", torch.zeros(4, 2, dtype=torch.bfloat16)), "weights: dtype"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_decode_dispatch_rejects_malformed_headers(case: str) -> None:
    mutate, match = MALFORMED[case]
    chunk = valid_chunk()
    decode_dispatch(chunk, **MODEL)  # type: ignore[arg-type]
    mutate(chunk)
    with pytest.raises(InvalidArgument, match=match) as info:
        decode_dispatch(chunk, **MODEL)  # type: ignore[arg-type]
    assert type(info.value) is InvalidArgument


def test_decode_dispatch_accepts_the_edges() -> None:
    chunk = valid_chunk()
    chunk.layer = 3
    chunk.row_offset, chunk.total_rows = 6, 10
    chunk.expert_ids.CopyFrom(encode_tensor(torch.tensor([[-1, 15]] * 4, dtype=torch.int32)))
    d = decode_dispatch(chunk, **MODEL)  # type: ignore[arg-type]
    assert (d.layer, d.row_offset, d.rows, d.total_rows) == (3, 6, 4, 10)


def answer(offset: int, rows: int, total: int = 10, value: float = 0.0) -> expert_pb2.CombineChunk:
    return expert_pb2.CombineChunk(
        micro_batch=1,
        layer=2,
        row_offset=offset,
        total_rows=total,
        hidden=encode_tensor(torch.full((rows, 4), float(value))),
    )


def test_assembler_places_out_of_order_parts() -> None:
    assembler = CombineAssembler(10, 4, torch.float32)
    assert not assembler.add(answer(7, 3, value=3))
    assert not assembler.add(answer(0, 2, value=1))
    with pytest.raises(InternalError, match="5 of 10"):
        assembler.result()
    assert assembler.add(answer(2, 5, value=2))
    expected = torch.tensor([1.0] * 2 + [2.0] * 5 + [3.0] * 3)[:, None].expand(10, 4)
    result = assembler.result()
    assert torch.equal(result, expected)
    result.add_(1)  # the result is an owned, writable tensor


@pytest.mark.parametrize(
    ("first", "second"),
    [((0, 4), (0, 4)), ((2, 4), (0, 3)), ((2, 4), (5, 2)), ((2, 4), (3, 1)), ((2, 4), (0, 10))],
)
def test_assembler_rejects_duplicates_and_overlaps(first: tuple[int, int], second: tuple[int, int]) -> None:
    assembler = CombineAssembler(10, 4, torch.float32)
    assembler.add(answer(*first))
    with pytest.raises(InvalidArgument, match="overlap"):
        assembler.add(answer(*second))
    start, rows = first
    # a rejected part changes nothing: the rows around the first part still complete the result
    if start > 0:
        assert not assembler.add(answer(0, start))
    assert assembler.add(answer(start + rows, 10 - start - rows))


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (answer(8, 3), "does not fit"),
        (answer(0, 0), "does not fit"),
        (answer(0, 2, total=11), "total_rows 11"),
        (expert_pb2.CombineChunk(micro_batch=1, layer=2, total_rows=10), "does not fit"),
        (
            expert_pb2.CombineChunk(
                micro_batch=1,
                layer=2,
                total_rows=10,
                hidden=encode_tensor(torch.zeros(2, 4, dtype=torch.float16)),
            ),
            "dtype",
        ),
        (
            expert_pb2.CombineChunk(
                micro_batch=1, layer=2, total_rows=10, hidden=encode_tensor(torch.zeros(2, 5))
            ),
            "shape",
        ),
        (
            expert_pb2.CombineChunk(
                micro_batch=2, layer=2, total_rows=10, hidden=encode_tensor(torch.zeros(2, 4))
            ),
            "expected",
        ),
    ],
)
def test_assembler_rejects_parts_that_do_not_fit(msg: expert_pb2.CombineChunk, match: str) -> None:
    assembler = CombineAssembler(10, 4, torch.float32, micro_batch=1, layer=2)
    with pytest.raises(InvalidArgument, match=match):
        assembler.add(msg)


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        ("INVALID_ARGUMENT", InvalidArgument),
        ("RESOURCE_EXHAUSTED", ResourceExhausted),
        ("UNAVAILABLE", Unavailable),
        ("DEADLINE_EXCEEDED", DeadlineExceeded),
        ("INTERNAL", InternalError),
        ("NO_SUCH_CODE", InternalError),
        ("", InternalError),
    ],
)
def test_error_chunk_raises_the_mapped_error(code: str, error_class: type[Exception]) -> None:
    assembler = CombineAssembler(10, 4, torch.float32)
    msg = expert_pb2.CombineChunk.FromString(
        error_combine(1, 2, 0, 10, code, "expert 3 exploded").SerializeToString()
    )
    assert msg.error == common_pb2.Error(code=code, message="expert 3 exploded")
    with pytest.raises(error_class, match="expert 3 exploded") as info:
        assembler.add(msg)
    assert type(info.value) is error_class


def test_combine_chunk_rejects_a_result_of_the_wrong_rows() -> None:
    (d,) = decode_all([valid_chunk()], **MODEL)
    with pytest.raises(InternalError, match="4 rows"):
        combine_chunk(d, torch.zeros(3, 8, dtype=torch.bfloat16))
    msg = combine_chunk(d, torch.zeros(4, 8, dtype=torch.bfloat16), queue_nanos=11, compute_nanos=22)
    assert (msg.micro_batch, msg.layer, msg.row_offset, msg.total_rows) == (1, 1, 2, 10)
    assert (msg.queue_nanos, msg.compute_nanos) == (11, 22)
    assert not msg.HasField("error")


def test_assembler_rejects_negative_or_zero_width_sizes() -> None:
    with pytest.raises(InvalidArgument):
        CombineAssembler(-1, 4, torch.float32)
    with pytest.raises(InvalidArgument):
        CombineAssembler(3, 0, torch.float32)


def test_empty_sync_dispatch_round_trip() -> None:
    """In sync mode a rank with nothing for an expert rank still sends one empty chunk (total_rows 0)."""
    empty = torch.zeros(0, 8, dtype=torch.bfloat16)
    ids = torch.zeros(0, 2, dtype=torch.int32)
    with pytest.raises(InvalidArgument, match="sync"):
        dispatch_chunks(
            micro_batch=1, layer=0, attention_rank=0, hidden=empty, expert_ids=ids, weights=ids.float()
        )
    (chunk,) = dispatch_chunks(
        micro_batch=1, layer=0, attention_rank=0, hidden=empty, expert_ids=ids, weights=ids.float(),
        sync=SyncStep(7, 2),
    )  # fmt: skip
    (d,) = decode_all([chunk], **MODEL)
    assert (d.rows, d.total_rows, d.sync) == (0, 0, SyncStep(7, 2))
    async_chunk = expert_pb2.DispatchChunk()
    async_chunk.CopyFrom(chunk)
    async_chunk.sync_participants = 0
    with pytest.raises(InvalidArgument, match="at least one row"):
        decode_all([async_chunk], **MODEL)
    assembler = CombineAssembler(0, 8, torch.bfloat16)
    assert not assembler.complete
    assert assembler.add(combine_chunk(d, torch.zeros(0, 8, dtype=torch.bfloat16), barrier_nanos=5))
    assert assembler.result().shape == (0, 8)
