"""What both ends of a GPU fast link agree on (``asap.dataplane.gpu_fast``, ``expert_svc.gpu_fastlane``):
the size of a GPU slot, the row count a slot's payload is laid out for (the token bucket, so the expert's
captured step for the bucket reads fixed views of the slot), and how long the poll threads spin.

Kept apart from the attention plane so the expert side imports the layout without the attention end.
"""

from __future__ import annotations

import os

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.plane import LinkSpec
from asap.dataplane.ring import LINE
from asap.model.grouped import BUCKETS, bucket_for

__all__ = [
    "ARMED_STEPS_ENV",
    "DEFAULT_GPU_SLOT_BYTES",
    "DEVICE_DONE_ENV",
    "GPU_EXPERT_SPIN_S",
    "GPU_POLL_SPIN_S",
    "HOST_FREE_ENV",
    "LEAN_FILL_ENV",
    "LOOP_BELL_ENV",
    "PREFETCH_ENV",
    "STEP_WORDS_AT",
    "armed_steps_enabled",
    "device_done_enabled",
    "env_switch",
    "gpu_layout_rows",
    "gpu_slot_bytes_for",
    "host_free_enabled",
    "lean_fill_enabled",
    "loop_bell_enabled",
    "prefetch_enabled",
]

STEP_WORDS_AT = 2 * LINE
"""Offset in a device slot (after the two flags) of three int32 words the attention's tx stream writes
before the request flag: the dispatch's row count, its layer and its sequence number. The expert's
captured step reads them on the device, so it can be enqueued before the descriptor arrives (armed):
it computes only when the words name its bucket and window and the request flag holds their seq."""
ARMED_STEPS_ENV = "ASAP_GPU_ARMED_STEPS"
"""Default ``1``: each slot's next captured step waits, pre-enqueued, on the slot's own stream
(``expert_svc.gpu_link_end``), so the attention stream's flag write starts it with no host in between.
``0`` (or ``off``): the expert rank enqueues each captured step when its descriptor arrives. A pending wait holds
its hardware queue, not only its stream: armed steps wait on streams of their own, probed for a queue
no other stream of the process uses (``asap.dataplane.gpu_streams``, which says why that is
deadlock-free); a slot that gets no such stream is not armed."""
PREFETCH_ENV = "ASAP_GPU_PREFETCH"
"""``0``: the attention end copies results out when their completion arrives; default ``1``: the wait
for the done flag and the copy out are enqueued at publication on the slot's own wait stream
(``asap.dataplane.gpu_attention_end``, once the expert attached, while wait streams are left)."""


def env_switch(name: str, default: bool, environ: dict[str, str] | None = None) -> bool:
    """A GPU fast-path switch from the environment: unset or empty gives ``default``; a switch on by
    default is off only for ``0`` / ``off`` / ``false`` / ``no``, one off by default is on only for ``1`` /
    ``on`` / ``true`` / ``yes`` (case and spaces ignored)."""
    value = (environ if environ is not None else os.environ).get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "off", "false", "no") if default else value in ("1", "on", "true", "yes")


def prefetch_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(PREFETCH_ENV, True, environ)


LEAN_FILL_ENV = "ASAP_GPU_LEAN_FILL"
"""``1``: the attention end fills a slot with the fewest host calls (its views cached per layout, the
step words and the request flag in one ``cuStreamBatchMemOp``, or default stream writes where that is
refused) and, on the hot path, on the compute thread's own stream (no cross-stream wait, no
``record_stream``); default ``0``: the fill of before (views per dispatch, the words copied from pinned
memory, every fill on the link's tx stream). Off by default until the full ``tests/gpu`` ran with it
(benchmarks/README.md, "GPU fast plane: a lean fill and early results")."""
HOST_FREE_ENV = "ASAP_GPU_HOST_FREE"
"""``1`` (hot path only, with prefetch): a dispatch's ticket is settled right after publication with
its prefetched results (their event passes once the expert's done flag, or a poison, released the
copy), so the combine is enqueued without a host waiting for the expert's completion; the completion
is the verdict the compute thread checks before the next layer's dispatches
(``asap.dataplane.direct``: early results). Default off."""


def lean_fill_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(LEAN_FILL_ENV, False, environ)


def host_free_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(HOST_FREE_ENV, False, environ)


LOOP_BELL_ENV = "ASAP_GPU_LOOP_BELL"
"""Default on (``0`` turns it off): with the hot path off (``ASAP_GPU_HOT_PATH``), the attention rank's
event loop waits on a GPU link's completion doorbell itself (``AttentionLinkEnd.loop_bell``): one
wake-up per completion instead of two (the poll thread's, then the loop's through
``call_soon_threadsafe``)."""


def loop_bell_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(LOOP_BELL_ENV, True, environ)


DEVICE_DONE_ENV = "ASAP_GPU_DEVICE_DONE"
"""``1``: where the slots lie on the expert's GPU, an armed link's captured step writes the slot's done
flag itself right after the results (the host's later write of the same value stays), so the peer's
copy out need not wait for the expert host to take the descriptor. Default off: in the one A/B run on
an H200 it changed nothing measurable (0.605 vs 0.610 ms at 1k tokens, 1.112 vs 1.094 ms at 8k: the
host's write came as early as the step's end), and the GPU test that checks it has not run yet."""


def device_done_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(DEVICE_DONE_ENV, False, environ)


def armed_steps_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(ARMED_STEPS_ENV, True, environ)


DEFAULT_GPU_SLOT_BYTES = 72 * 1024 * 1024
"""Bytes per GPU slot: 16k rows at hidden 2048 or 8k at 4096 in bf16, with top-8 ids and weights."""
GPU_POLL_SPIN_S = float(os.environ.get("ASAP_GPU_POLL_SPIN_S", "0"))
"""How long the GPU fast plane's poll threads spin before they park on the doorbells (default: not at
all). Measured on one H200 host: a 2 ms spin made every hand-off between the threads of a process wait
for the GIL (the spinning thread holds it but for the 5 ms switch interval): 6.5 ms round trips against
1.7 ms parked."""
GPU_EXPERT_SPIN_S = float(os.environ.get("ASAP_GPU_EXPERT_SPIN_S", str(GPU_POLL_SPIN_S)))
"""The same for the expert rank's poll thread alone (default: ``GPU_POLL_SPIN_S``). With captured and
armed steps that thread answers the dispatches itself (no hand-off to the compute thread that a spin
would hold the GIL from), so its doorbell wake-up is the only thing a spin can save there."""


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
