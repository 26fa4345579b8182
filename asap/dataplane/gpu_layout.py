"""What both ends of a GPU fast link agree on (``asap.dataplane.gpu_fast``, ``expert_svc.gpu_fastlane``):
the size of a GPU slot, the row count a slot's payload is laid out for (the token bucket, so the expert's
captured step for the bucket reads fixed views of the slot), and how long the poll threads spin.

Kept apart from the attention plane so the expert side imports the layout without the attention end.
"""

from __future__ import annotations

import os

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.plane import LinkSpec
from asap.model.grouped import BUCKETS, bucket_for

__all__ = ["DEFAULT_GPU_SLOT_BYTES", "GPU_POLL_SPIN_S", "gpu_layout_rows", "gpu_slot_bytes_for"]

DEFAULT_GPU_SLOT_BYTES = 72 * 1024 * 1024
"""Bytes per GPU slot: 16k rows at hidden 2048 or 8k at 4096 in bf16, with top-8 ids and weights."""
GPU_POLL_SPIN_S = float(os.environ.get("ASAP_GPU_POLL_SPIN_S", "0"))
"""How long the GPU fast plane's poll threads spin before they park on the doorbells (default: not at
all). Measured on one H200 host: a 2 ms spin made every hand-off between the threads of a process wait
for the GIL (the spinning thread holds it but for the 5 ms switch interval): 6.5 ms round trips against
1.7 ms parked."""


def gpu_layout_rows(geometry: LinkGeometry, rows: int) -> int:
    """The row count a GPU slot's payload is laid out for (``LinkGeometry.payload``) when it carries
    ``rows`` rows: the next token bucket where that fits the slot, else ``rows``. Both ends lay out by
    it, so a slot's ids and weights lie where the expert rank's captured step for the bucket reads them
    (``expert_svc.gpu_graph``); the rows past ``rows`` are left as they were."""
    bucket = bucket_for(rows)
    if (
        rows <= 0
        or bucket not in BUCKETS
        or geometry.payload(bucket, shape_only=False)[3] > geometry.slot_bytes
    ):
        return rows
    return bucket


def gpu_slot_bytes_for(spec: LinkSpec, slots: int) -> int:
    size = spec.region_bytes // slots if spec.region_bytes else DEFAULT_GPU_SLOT_BYTES
    return max(8192, size // 4096 * 4096)
