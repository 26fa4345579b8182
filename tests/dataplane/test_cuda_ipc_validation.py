"""CUDA IPC data plane, the parts that need no GPU: validation of announcements and references, and
forcing the plane where it cannot work (the GPU paths run in tests/gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.dataplane.cuda_ipc import CudaAttachments, CudaRegion, visible_gpu_uuids
from asap.errors import InvalidArgument
from asap.v1 import common_pb2
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _ref(region: str, offset: int, nbytes: int) -> common_pb2.Tensor:
    return common_pb2.Tensor(
        dtype=common_pb2.BFLOAT16,
        shape=[2, 4],
        cuda_ipc=common_pb2.RegionRef(region=region, offset=offset, nbytes=nbytes),
    )


def test_references_need_an_announced_mappable_region() -> None:
    attachments = CudaAttachments()
    assert visible_gpu_uuids() == []
    with pytest.raises(InvalidArgument, match="was not announced on this stream"):
        attachments.decode(_ref("cuda_a", 0, 16), [2, 4], "rows")
    with pytest.raises(InvalidArgument, match="cannot see"):
        attachments.announce(
            common_pb2.CudaRegion(name="cuda_a", device_uuid="GPU-1234", handle=b"h", storage_bytes=64)
        )
    shm_ref = common_pb2.Tensor(
        dtype=common_pb2.BFLOAT16, shape=[2, 4], shm=common_pb2.RegionRef(region="asap_x")
    )
    with pytest.raises(InvalidArgument, match="shared-memory reference on the CUDA IPC data plane"):
        attachments.decode(shm_ref, [2, 4], "rows")
    attachments.close()


def test_regions_live_on_cuda_devices_only() -> None:
    with pytest.raises(InvalidArgument, match="needs a cuda device"):
        CudaRegion.create("cpu", 1024)


async def test_forced_cuda_ipc_fails_at_start_up_without_cuda(qwen3_dir: Path) -> None:
    expert = ExpertService(ExpertServiceConfig(model=str(qwen3_dir), data_plane="cuda-ipc"))
    with pytest.raises(InvalidArgument, match="cuda-ipc is not possible"):
        await expert.start()
    await expert.stop(grace_s=0)
    expert = ExpertService(ExpertServiceConfig(model=str(qwen3_dir)))
    try:
        target = await expert.start()
        attention = AttentionService(
            AttentionServiceConfig(model=str(qwen3_dir), expert_targets=[target], data_plane="cuda-ipc")
        )
        with pytest.raises(InvalidArgument, match="is not cuda"):
            await attention.start()
        await attention.stop(grace_s=0)
    finally:
        await expert.stop(grace_s=0)
