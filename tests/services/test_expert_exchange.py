"""ExpertExchange / ExchangeSession: an expert rank's handling of Exchange streams, without grpc."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from asap.emulation import load_profile
from asap.emulation.costs import transfer_s
from asap.errors import InvalidArgument
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.rpc.duplex import Outbox
from asap.syncstep import SyncStep
from asap.v1 import expert_pb2
from asap.wire.chunks import CombineAssembler, dispatch_chunks
from expert_svc.core import ExpertExecutor
from expert_svc.exchange import ExpertExchange, Outbound
from tests.waiting import until

HOSTED = [0, 1, 2, 3]


@pytest.fixture
async def executor(qwen3_dir: Path) -> AsyncIterator[ExpertExecutor]:
    config = load_config(qwen3_dir)
    with CheckpointReader(qwen3_dir) as reader:
        part = ExpertPart.from_source(reader, config, HOSTED)
    executor = ExpertExecutor(part)
    await executor.start()
    try:
        yield executor
    finally:
        await executor.stop()


@pytest.fixture
def codec() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool  # type: ignore[misc]
    pool.shutdown(wait=True)


def _rows(executor: ExpertExecutor, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = executor.part.config
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, cfg.hidden_size, generator=g)
    ids = torch.tensor(HOSTED)[torch.randint(len(HOSTED), (rows, cfg.top_k), generator=g)].to(torch.int32)
    return hidden, ids, torch.rand(rows, cfg.top_k, generator=g)


def _chunk(
    executor: ExpertExecutor,
    rows: int,
    *,
    micro_batch: int,
    layer: int = 0,
    attention_rank: int = 0,
    sync: SyncStep | None = None,
    seed: int = 0,
) -> tuple[expert_pb2.DispatchChunk, torch.Tensor]:
    """One dispatch chunk and the result the experts owe it."""
    hidden, ids, weights = _rows(executor, rows, seed)
    (chunk,) = dispatch_chunks(
        micro_batch=micro_batch,
        layer=layer,
        attention_rank=attention_rank,
        hidden=hidden,
        expert_ids=ids,
        weights=weights,
        sync=sync,
    )
    valid = rows and layer in executor.part.config.moe_layer_ids
    expected = executor.part.compute(layer, hidden, ids, weights) if valid else hidden
    return chunk, expected


def _result(executor: ExpertExecutor, answer: expert_pb2.CombineChunk) -> torch.Tensor:
    cfg = executor.part.config
    assembler = CombineAssembler(answer.total_rows, cfg.hidden_size, executor.part.dtype)
    assert assembler.add(answer)
    return assembler.result()


class Stream:
    """A session running over an ``Outbox`` of chunks, its answers on a queue."""

    def __init__(self, exchange: ExpertExchange) -> None:
        self.chunks: Outbox[expert_pb2.DispatchChunk] = Outbox()
        self.answers: Outbound = asyncio.Queue()
        self.session = exchange.session()
        self.task = asyncio.create_task(self.session.run(aiter(self.chunks), self.answers))

    async def answer(self) -> expert_pb2.CombineChunk:
        item = await asyncio.wait_for(self.answers.get(), 30)
        assert item is not None
        return item

    async def end(self) -> None:
        self.chunks.close()
        await asyncio.wait_for(self.task, 30)
        assert self.answers.get_nowait() is None  # the stream's end is queued last
        self.session.close()


async def test_async_chunks_are_answered_with_their_experts_results(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    stream = Stream(ExpertExchange(executor, codec))
    expected = {}
    for mb, rows in ((1, 3), (2, 5)):
        chunk, expected[mb] = _chunk(executor, rows, micro_batch=mb, seed=mb)
        stream.chunks.put(chunk)
    for _ in range(2):
        answer = await stream.answer()
        torch.testing.assert_close(_result(executor, answer), expected[answer.micro_batch], rtol=0, atol=1e-6)
    await stream.end()


async def test_a_malformed_chunk_is_answered_with_an_error_and_the_stream_goes_on(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    stream = Stream(ExpertExchange(executor, codec))
    bad, _ = _chunk(executor, 2, micro_batch=7, layer=99)
    good, expected = _chunk(executor, 2, micro_batch=8)
    stream.chunks.put(bad)
    stream.chunks.put(good)
    first, second = await stream.answer(), await stream.answer()
    assert (first.micro_batch, first.error.code) == (7, InvalidArgument.code)
    assert "out of range" in first.error.message
    assert second.micro_batch == 8 and not second.HasField("error")
    torch.testing.assert_close(_result(executor, second), expected, rtol=0, atol=1e-6)
    await stream.end()


async def test_sync_chunks_wait_for_every_participant_and_an_empty_one_is_answered_empty(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    exchange = ExpertExchange(executor, codec)
    busy, idle = Stream(exchange), Stream(exchange)
    step = SyncStep(4, 2)
    chunk, expected = _chunk(executor, 3, micro_batch=1, attention_rank=0, sync=step)
    busy.chunks.put(chunk)
    assert await until(lambda: exchange.barrier.open_groups == 1)
    assert busy.answers.empty() and exchange.barrier.open_groups == 1  # held for attention rank 1
    empty, _ = _chunk(executor, 0, micro_batch=9, attention_rank=1, sync=step)
    idle.chunks.put(empty)
    answered, empty_answer = await busy.answer(), await idle.answer()
    torch.testing.assert_close(_result(executor, answered), expected, rtol=0, atol=1e-6)
    assert (empty_answer.micro_batch, empty_answer.total_rows, list(empty_answer.hidden.shape)) == (
        9,
        0,
        [0, 64],
    )
    assert exchange.barrier.open_groups == 0
    await busy.end()
    await idle.end()


async def test_without_overlap_a_chunk_is_answered_before_the_next_is_read(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    exchange = ExpertExchange(executor, codec, overlap=False)
    chunks = [_chunk(executor, 2, micro_batch=mb, seed=mb)[0] for mb in (1, 2, 3)]
    answers: Outbound = asyncio.Queue()
    answered_before_read: list[int] = []

    async def messages() -> AsyncIterator[expert_pb2.DispatchChunk]:
        for chunk in chunks:
            answered_before_read.append(answers.qsize())
            yield chunk

    session = exchange.session()
    await asyncio.wait_for(session.run(messages(), answers), 30)
    assert answered_before_read == [0, 1, 2]
    order = [answers.get_nowait() for _ in chunks]
    assert [a.micro_batch for a in order if a is not None] == [1, 2, 3]
    session.close()


async def test_emulated_transfer_charge_is_the_result_bytes_at_link_speed(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    profile = load_profile("h200")
    charged = ExpertExchange(executor, codec, profile=profile)
    cfg = executor.part.config
    assert charged.shape_only
    assert charged.transfer_s(10) == transfer_s(10 * cfg.hidden_size * executor.part.dtype.itemsize, profile)
    assert ExpertExchange(executor, codec).transfer_s(10) == 0.0


async def test_a_cancelled_session_abandons_its_replies(
    executor: ExpertExecutor, codec: ThreadPoolExecutor
) -> None:
    exchange = ExpertExchange(executor, codec)
    stream = Stream(exchange)
    chunk, _ = _chunk(executor, 3, micro_batch=1, sync=SyncStep(1, 2))  # waits at the barrier forever
    stream.chunks.put(chunk)
    await until(lambda: exchange.barrier.open_groups == 1)
    assert exchange.barrier.open_groups == 1
    stream.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream.task
    assert stream.answers.empty()
    stream.session.close()
