"""The in-process transport: the expert rank's own servicer answers the attention rank's plane, and the
round trip takes exactly its modelled link and compute time on the virtual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asap.emulation.costs import transfer_s
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import load_config
from asap.model.placement import RankDispatch
from asap.optimizations import OPTIMIZATIONS
from asap.rpc.duplex import DuplexStream
from asap.sim.devices import ChargeSleeper, Device, DeviceQueue, Inline
from asap.sim.direct import DirectExpertTransport
from asap.sim.loop import run
from asap.sim.transport import InProcessExpertTransport, servicer_opener
from asap.syncstep import SyncStep
from asap.wire.chunks import dispatch_bytes
from expert_svc.build import build_executor
from expert_svc.config import ExpertServiceConfig
from expert_svc.exchange import ExpertExchange
from expert_svc.server import ExpertServicer


class EchoServicer:
    """A streaming handler shaped like the services' (request iterator, context) -> async generator."""

    async def Run(self, requests: AsyncIterator[int], context: Any) -> AsyncIterator[int]:
        async for value in requests:
            yield value * 10


def test_a_servicer_handler_serves_a_duplex_stream() -> None:
    async def main() -> list[int]:
        stream: DuplexStream[int, int, int] = DuplexStream(
            servicer_opener(EchoServicer().Run), key_of=lambda answer: answer // 10, peer="echo"
        )
        try:
            return list(await asyncio.gather(*(stream.request(i, i) for i in (1, 2, 3))))
        finally:
            await stream.close()

    assert run(main())[0] == [10, 20, 30]


def _expert(model: Path) -> ExpertServicer:
    config = ExpertServiceConfig(
        model=str(model), compute="emulated:h200", optimizations=frozenset(OPTIMIZATIONS)
    )
    sleeper, device = ChargeSleeper(), Device("expert")
    executor = build_executor(config, sleeper=sleeper, compute=DeviceQueue([device], sleeper))
    exchange = ExpertExchange(executor, Inline(), profile=load_profile("h200"))
    return ExpertServicer(exchange, 0, "cpu")


def _transport(kind: str, servicer: ExpertServicer, hidden: int, link_s: Any) -> Any:
    """The stream transport (the servicer's ``Exchange`` handler) or the direct one (its exchange)."""
    link: dict[str, Any] = {"attention_rank": 0, "hidden_size": hidden, "dtype": torch.float32}
    link.update(max_chunk_bytes=2 * 1024 * 1024, link_s=link_s)
    if kind == "direct":
        return DirectExpertTransport([servicer.exchange], **link)
    return InProcessExpertTransport([servicer], **link)


@pytest.mark.parametrize("kind", ["stream", "direct"])
@pytest.mark.parametrize("sync", [None, SyncStep(step=1, participants=1)])
def test_round_trip_costs_its_modelled_time(qwen3_dir: Path, sync: SyncStep | None, kind: str) -> None:
    cfg = load_config(qwen3_dir)
    profile = load_profile("h200")
    rows, h, k = 100, cfg.hidden_size, cfg.top_k

    async def main() -> tuple[tuple[int, ...], float, float]:
        servicer = _expert(qwen3_dir)
        await servicer.exchange.executor.start()
        transport = _transport(kind, servicer, h, lambda nbytes: transfer_s(nbytes, profile))
        g = torch.Generator().manual_seed(0)
        ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:k] for _ in range(rows)])
        dispatch = RankDispatch(
            rank=0,
            rows=torch.arange(rows),
            hidden=torch.empty((rows, h), device="meta"),
            expert_ids=ids.to(torch.int32),
            weights=torch.full((rows, k), 1.0 / k),
        )
        part = servicer.exchange.executor.part
        expected = part.call_s(dispatch.expert_ids) + transfer_s(rows * h * 4, profile)  # type: ignore[attr-defined]
        expected += transfer_s(dispatch_bytes(rows, h, k, 4), profile)
        try:
            result = await transport.exchange(0, 1, cfg.moe_layer_ids[0], dispatch, sync=sync)
            return tuple(result.hidden.shape), asyncio.get_running_loop().time(), expected
        finally:
            await transport.close()
            await servicer.exchange.executor.stop()

    (shape, elapsed, expected), _ = run(main())
    assert shape == (rows, h)
    assert elapsed == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kind", ["stream", "direct"])
@pytest.mark.parametrize("sync", [None, SyncStep(step=1, participants=1)])
def test_an_expert_rank_rejection_fails_that_exchange_only(
    qwen3_dir: Path, sync: SyncStep | None, kind: str
) -> None:
    cfg = load_config(qwen3_dir)
    rows, h, k = 4, cfg.hidden_size, cfg.top_k

    def dispatch(bad: bool) -> RankDispatch:
        ids = torch.arange(k, dtype=torch.int32).repeat(rows, 1)
        if bad:
            ids[0, 0] = cfg.num_experts + 3  # no such expert: the expert rank's validation refuses it
        return RankDispatch(
            rank=0,
            rows=torch.arange(rows),
            hidden=torch.empty((rows, h), device="meta"),
            expert_ids=ids,
            weights=torch.full((rows, k), 1.0 / k),
        )

    async def main() -> tuple[str, tuple[int, ...]]:
        servicer = _expert(qwen3_dir)
        await servicer.exchange.executor.start()
        transport = _transport(kind, servicer, h, lambda nbytes: 1e-6)
        layer = cfg.moe_layer_ids[0]
        try:
            with pytest.raises(InvalidArgument) as refused:
                await transport.exchange(0, 1, layer, dispatch(True), sync=sync)
            step = SyncStep(step=2, participants=1) if sync is not None else None
            result = await transport.exchange(0, 2, layer, dispatch(False), sync=step)
            return refused.value.message, tuple(result.hidden.shape)
        finally:
            await transport.close()
            await servicer.exchange.executor.stop()

    (message, shape), _ = run(main())
    assert "failed on the expert rank" in message and str(cfg.num_experts + 3) in message
    assert shape == (rows, h)


@pytest.mark.parametrize("charge_empty", [False, True])
def test_an_empty_dispatch_pays_the_host_path_when_asked(qwen3_dir: Path, charge_empty: bool) -> None:
    cfg = load_config(qwen3_dir)
    host_s = 0.005

    async def main() -> float:
        servicer = _expert(qwen3_dir)
        await servicer.exchange.executor.start()
        transport = _transport("direct", servicer, cfg.hidden_size, lambda nbytes: host_s + nbytes * 1e-12)
        for plane in transport.planes:
            plane.charge_empty = charge_empty
        dispatch = RankDispatch(
            rank=0,
            rows=torch.arange(0),
            hidden=torch.empty((0, cfg.hidden_size), device="meta"),
            expert_ids=torch.empty((0, cfg.top_k), dtype=torch.int32),
            weights=torch.empty((0, cfg.top_k)),
        )
        try:
            await transport.exchange(0, 1, cfg.moe_layer_ids[0], dispatch, sync=None)
            return asyncio.get_running_loop().time()
        finally:
            await transport.close()
            await servicer.exchange.executor.stop()

    took = run(main())[0]
    assert took == pytest.approx(host_s if charge_empty else 0.0)
