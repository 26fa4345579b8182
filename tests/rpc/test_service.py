"""GrpcService: the lifecycle base of the three services (address, stop grace, idempotent stop)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from asap.errors import InternalError
from asap.rpc.server import create_server
from asap.rpc.service import GrpcService


@dataclass
class Config:
    address: str = "127.0.0.1:0"
    drain_timeout_s: float = 7.0


class Echo(GrpcService):
    def __init__(self, config: Config) -> None:
        super().__init__(config, describe="echo", tracing_name="asap-echo")
        self.graces: list[float] = []
        self.drained = 0

    async def start(self) -> str:
        self.handle = await create_server("127.0.0.1:0", lambda server: None, [])
        await self.handle.set_serving()
        return self.address

    async def drain(self) -> None:
        self.drained += 1

    async def shutdown(self, grace_s: float) -> None:
        self.graces.append(grace_s)
        await self.stop_server(grace_s)


async def test_address_needs_a_started_server() -> None:
    service = Echo(Config())
    with pytest.raises(InternalError, match="not started"):
        _ = service.address
    address = await service.start()
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0  # the real port of port 0
        assert service.address == address
    finally:
        await service.stop(grace_s=0)


async def test_stop_defaults_to_the_drain_timeout_and_is_safe_twice() -> None:
    service = Echo(Config(drain_timeout_s=0.5))
    await service.start()
    await service.stop()
    assert service.handle is None
    await service.stop(grace_s=0)  # nothing left to stop
    assert service.graces == [0.5, 0]
    with pytest.raises(InternalError):
        _ = service.address
