"""The same-host regions of one ``Expert.Exchange`` stream, expert side: references are decoded into
rows (a private copy from shared memory, a zero-copy view of CUDA IPC memory), and each chunk's results
are written back over its rows before it is answered (see ``asap.dataplane``)."""

from __future__ import annotations

import torch

from asap.dataplane.cuda_ipc import CudaAttachments
from asap.dataplane.shm import ShmAttachments
from asap.errors import InternalError, InvalidArgument
from asap.v1 import common_pb2, expert_pb2
from asap.wire import chunks
from expert_svc.core import ExpertResult

__all__ = ["StreamRegions"]


class StreamRegions:
    """The same-host regions one ``Exchange`` stream uses: decode references, write results back."""

    def __init__(self, shm: ShmAttachments | None, cuda: CudaAttachments | None) -> None:
        self.shm = shm
        self.cuda = cuda
        self.enabled = shm is not None or cuda is not None

    def announce(self, region: common_pb2.CudaRegion) -> None:
        if self.cuda is None:
            raise InvalidArgument("a CUDA IPC region was announced, but this rank has no cuda-ipc data plane")
        self.cuda.announce(region)

    def decode(self, msg: common_pb2.Tensor, dims: list[int], what: str) -> torch.Tensor:
        if msg.HasField("cuda_ipc"):
            if self.cuda is None:
                raise InvalidArgument(f"{what}: CUDA IPC references need the cuda-ipc data plane")
            return self.cuda.decode(msg, dims, what)
        if self.shm is None:
            raise InvalidArgument(f"{what}: shared-memory references need the shm data plane")
        return self.shm.decode(msg, dims, what)

    def answer(
        self, dispatch: chunks.Dispatch, result: ExpertResult, barrier_ns: int
    ) -> expert_pb2.CombineChunk:
        """On the codec thread: the chunk's answer, its results written back into the region the rows
        came from (then referenced) or encoded inline; returns once any device copy is done."""
        ref = dispatch.hidden_ref
        hidden_msg = None
        if ref is not None and dispatch.rows:
            plane = self.cuda if ref.HasField("cuda_ipc") else self.shm
            if plane is None:
                raise InternalError("a region reference was decoded without its data plane")
            hidden_msg = plane.write_back(ref, result.hidden, result.ready)
        elif result.ready is not None:  # computed on the compute stream: wait for it before the copy out
            torch.cuda.current_stream(result.hidden.device).wait_event(result.ready)
        msg = chunks.combine_chunk(
            dispatch,
            result.hidden,
            queue_nanos=result.queue_ns,
            compute_nanos=0,
            barrier_nanos=barrier_ns,
            hidden_msg=hidden_msg,
        )
        msg.compute_nanos = result.device_compute_ns()  # the copy above waited for the computation
        return msg

    def close(self) -> None:
        if self.cuda is not None:
            self.cuda.close()
