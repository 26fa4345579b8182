"""What the attention link end's unit tests share: an ``AttentionLinkEnd`` on its own, with no poll
thread (the test sweeps it, or plays the expert rank, itself)."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.fastlink import LinkGeometry

__all__ = ["NoPoller", "attention_end"]


class NoPoller:
    """Stands in for the process's poll thread: nothing sweeps the end but the test."""

    def add(self, endpoint: object) -> None:
        pass

    def remove(self, endpoint: object) -> None:
        pass


def attention_end(
    loop: asyncio.AbstractEventLoop,
    geometry: LinkGeometry | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    peer: str = "expert",
    **kw: Any,
) -> AttentionLinkEnd:
    """A link end of ``geometry`` (default: 2 slots of 64 KiB, hidden 8, top-2) on ``loop``."""
    return AttentionLinkEnd(
        geometry if geometry is not None else LinkGeometry(2, 1 << 16, 8, 2, 2),
        attention_rank=0,
        expert_rank=0,
        dtype=dtype,
        peer=peer,
        peer_timeout_s=5.0,
        loop=loop,
        poller=NoPoller(),  # type: ignore[arg-type]
        **kw,
    )
