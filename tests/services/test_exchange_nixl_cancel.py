"""An expert stream cancelled while its NIXL link connects on the codec thread: the cancellation waits for
the connect, and the end it made is detached (nobody would serve or close it otherwise)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from asap.v1 import expert_pb2
from expert_svc.exchange import ExchangeSession
from expert_svc.regions import StreamRegions


class _SlowNixl:
    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.made: list[object] = []
        self.detached: list[object] = []

    def connect(self, link: Any) -> tuple[object, expert_pb2.NixlLink]:
        self.entered.set()
        self.release.wait(30)
        end = object()
        self.made.append(end)
        return end, expert_pb2.NixlLink()

    def detach(self, end: object) -> None:
        self.detached.append(end)


async def test_a_link_connected_as_its_stream_is_cancelled_is_detached() -> None:
    nixl = _SlowNixl()
    with ThreadPoolExecutor(max_workers=1) as codec:
        session = ExchangeSession(SimpleNamespace(nixl=nixl, codec=codec), StreamRegions(None, None))  # type: ignore[arg-type]
        msg = expert_pb2.DispatchChunk(micro_batch=1, nixl_link=expert_pb2.NixlLink(agent="a0-e0"))
        task = asyncio.create_task(session._connect_nixl(msg))
        await asyncio.get_running_loop().run_in_executor(None, nixl.entered.wait, 30)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the connect on the codec thread
        nixl.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert nixl.made and nixl.detached == nixl.made
