"""expert_svc over real grpc (in-process server on port 0): Info, health, malformed chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asap.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from asap.wire.chunks import dispatch_chunks
from asap.wire.codec import decode_tensor
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService


@pytest.fixture
async def expert(qwen3_dir: Path) -> AsyncIterator[str]:
    service = ExpertService(ExpertServiceConfig(model=str(qwen3_dir), rank=0, num_ranks=2))
    address = await service.start()
    try:
        yield address
    finally:
        await service.stop(grace_s=0)


def _valid_chunk(layer: int = 0, micro_batch: int = 1) -> expert_pb2.DispatchChunk:
    hidden = torch.randn(3, 64)
    ids = torch.tensor([[0, -1], [1, 3], [-1, 2]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.0], [0.3, 0.2], [0.0, 0.9]])
    (chunk,) = dispatch_chunks(
        micro_batch=micro_batch, layer=layer, attention_rank=0, hidden=hidden, expert_ids=ids, weights=weights
    )
    return chunk


def _malformed() -> dict[str, expert_pb2.DispatchChunk]:
    wrong_bytes = _valid_chunk(micro_batch=10)
    wrong_bytes.hidden.data = wrong_bytes.hidden.data[:-4]
    unknown_dtype = _valid_chunk(micro_batch=11)
    unknown_dtype.hidden.dtype = 42  # type: ignore[assignment]
    layer_out_of_range = _valid_chunk(layer=99, micro_batch=12)
    unhosted_expert = _valid_chunk(micro_batch=13)
    unhosted_expert.expert_ids.CopyFrom(
        common_pb2.Tensor(
            dtype=common_pb2.INT32,
            shape=[3, 2],
            data=torch.full((3, 2), 7, dtype=torch.int32).numpy().tobytes(),
        )
    )
    # same-host data-plane references this rank cannot honour
    unknown_region = _valid_chunk(micro_batch=14)
    unknown_region.hidden.ClearField("data")
    unknown_region.hidden.shm.CopyFrom(
        common_pb2.RegionRef(region="asap_no_such_region", offset=0, nbytes=768)
    )
    cuda_ref = _valid_chunk(micro_batch=15)
    cuda_ref.hidden.ClearField("data")
    cuda_ref.hidden.cuda_ipc.CopyFrom(common_pb2.RegionRef(region="cuda_x", offset=0, nbytes=768))
    cuda_announcement = _valid_chunk(micro_batch=16)
    cuda_announcement.cuda_region.CopyFrom(
        common_pb2.CudaRegion(name="cuda_x", device_uuid="GPU-0", handle=b"x")
    )
    return {
        "wrong byte length": wrong_bytes,
        "unknown dtype": unknown_dtype,
        "layer out of range": layer_out_of_range,
        "expert not hosted": unhosted_expert,
        "unknown shared-memory region": unknown_region,
        "CUDA IPC reference on a CPU rank": cuda_ref,
        "CUDA IPC region announced to a CPU rank": cuda_announcement,
    }


async def test_info_and_health(expert: str) -> None:
    async with grpc.aio.insecure_channel(expert) as channel:
        info = await expert_pb2_grpc.ExpertStub(channel).Info(expert_pb2.ExpertInfoRequest())
        assert info.num_experts == 8 and info.hidden_size == 64 and info.rank == 0
        assert [list(entry.expert_ids) for entry in info.layers] == [[0, 1, 2, 3]] * 3
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_malformed_chunks_get_invalid_argument_and_the_stream_keeps_serving(expert: str) -> None:
    bad = _malformed()
    good = _valid_chunk(micro_batch=20)

    async def requests() -> AsyncIterator[expert_pb2.DispatchChunk]:
        for chunk in bad.values():
            yield chunk
        yield good

    async with grpc.aio.insecure_channel(expert) as channel:
        replies = {m.micro_batch: m async for m in expert_pb2_grpc.ExpertStub(channel).Exchange(requests())}
        assert set(replies) == {10, 11, 12, 13, 14, 15, 16, 20}
        for micro_batch in (10, 11, 12, 13, 14, 15, 16):
            assert replies[micro_batch].error.code == "INVALID_ARGUMENT", replies[micro_batch]
        assert "bytes" in replies[10].error.message
        assert "dtype" in replies[11].error.message
        assert "99" in replies[12].error.message
        assert "not hosted" in replies[13].error.message
        assert "asap_no_such_region" in replies[14].error.message
        assert "CUDA IPC references need the cuda-ipc data plane" in replies[15].error.message
        assert "no cuda-ipc data plane" in replies[16].error.message
        assert not replies[20].HasField("error")
        out = decode_tensor(replies[20].hidden, dtype=torch.float32, shape=(3, 64))
        assert out.shape == (3, 64) and torch.isfinite(out).all()

        # the service still serves a new stream afterwards
        async def one() -> AsyncIterator[expert_pb2.DispatchChunk]:
            yield _valid_chunk(micro_batch=30)

        again = [m async for m in expert_pb2_grpc.ExpertStub(channel).Exchange(one())]
        assert [m.micro_batch for m in again] == [30] and not again[0].HasField("error")
