"""The direct plane's exchange and the expert session's async replies as loop callbacks
(``DirectPlane.exchange``, ``expert_svc.reply.Reply``): the same result, virtual time and loop
iterations as the same steps run by tasks (``DirectPlane._exchange``, ``ExchangeSession._reply``);
cancellation, abandonment, a key twice, and the paths that keep the task (expert-overlap off, the
expert rank's queue full)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
import torch

from asap.dataplane.plane import PlaneRequest
from asap.emulation.costs import transfer_s
from asap.emulation.profiles import load_profile
from asap.model.config import ModelConfig, load_config
from asap.model.placement import RankDispatch
from asap.optimizations import OPTIMIZATIONS
from asap.sim.devices import ChargeSleeper, Device, DeviceQueue, Inline
from asap.sim.direct import DirectExpertTransport, DirectPlane
from asap.sim.loop import VirtualLoop, run
from asap.syncstep import SyncStep
from asap.wire.chunks import dispatch_bytes
from expert_svc import exchange as exchange_module
from expert_svc.build import build_executor
from expert_svc.config import ExpertServiceConfig
from expert_svc.core import ExpertExecutor
from expert_svc.exchange import ExpertExchange
from expert_svc.reply import Reply

H200 = load_profile("h200")


def _transport(model: Path, *, overlap: bool = True) -> DirectExpertTransport:
    config = ExpertServiceConfig(
        model=str(model), compute="emulated:h200", optimizations=frozenset(OPTIMIZATIONS)
    )
    sleeper, device = ChargeSleeper(), Device("expert")
    executor = build_executor(config, sleeper=sleeper, compute=DeviceQueue([device], sleeper))
    exchange = ExpertExchange(executor, Inline(), profile=H200, overlap=overlap)
    cfg = load_config(model)
    return DirectExpertTransport(
        [exchange],
        attention_rank=0,
        hidden_size=cfg.hidden_size,
        dtype=torch.float32,
        max_chunk_bytes=2 * 1024 * 1024,
        link_s=lambda nbytes: transfer_s(nbytes, H200),
    )


def _request(
    cfg: ModelConfig, micro_batch: int, rows: int = 50, sync: SyncStep | None = None
) -> PlaneRequest:
    g = torch.Generator().manual_seed(micro_batch)
    k = cfg.top_k
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:k] for _ in range(rows)])
    dispatch = RankDispatch(
        rank=0,
        rows=torch.arange(rows),
        hidden=torch.empty((rows, cfg.hidden_size), device="meta"),
        expert_ids=ids.to(torch.int32),
        weights=torch.full((rows, k), 1.0 / k),
    )
    return PlaneRequest(micro_batch, cfg.moe_layer_ids[0], dispatch, sync)


async def _session(transport: DirectExpertTransport, body: Any) -> Any:
    executor = transport.planes[0].session.shared.executor
    await executor.start()
    try:
        return await body(transport.planes[0])
    finally:
        await transport.close()
        await executor.stop()


@pytest.mark.parametrize("sync", [None, SyncStep(step=1, participants=1)])
def test_callbacks_take_the_tasks_iterations(
    qwen3_dir: Path, sync: SyncStep | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three exchanges at once, as a layer sends them: by callbacks (the plane's, and the expert
    session's ``Reply``) and by tasks (``_exchange``, ``_reply``), the same results, the same virtual
    time and the same loop iterations until each one's result is in."""
    cfg = load_config(qwen3_dir)
    never_waits = exchange_module.never_waits

    def measure(by_task: bool) -> list[tuple[tuple[int, ...], float, int]]:
        monkeypatch.setattr(exchange_module, "never_waits", (lambda _: False) if by_task else never_waits)

        async def body(plane: DirectPlane) -> list[tuple[tuple[int, ...], float, int]]:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, VirtualLoop)
            start = loop.iterations
            seen: list[tuple[tuple[int, ...], float, int]] = []
            steps = [sync if sync is None else SyncStep(step=mb, participants=1) for mb in (1, 2, 3)]
            requests = [
                _request(cfg, mb, rows=10 * mb, sync=step) for mb, step in zip((1, 2, 3), steps, strict=True)
            ]
            if by_task:
                calls = [asyncio.ensure_future(plane._exchange(r)) for r in requests]
            else:
                calls = [plane.exchange(r) for r in requests]
                assert not any(isinstance(c, asyncio.Task) for c in calls)

            def note(call: asyncio.Future[Any]) -> None:
                seen.append((tuple(call.result().hidden.shape), loop.time(), loop.iterations - start))

            for call in calls:
                call.add_done_callback(note)
            await asyncio.gather(*calls)
            return sorted(seen)

        result: list[tuple[tuple[int, ...], float, int]] = run(_session(_transport(qwen3_dir), body))[0]
        return result

    by_callbacks, by_task = measure(False), measure(True)
    assert [shape for shape, _, _ in by_callbacks] == [
        (10, cfg.hidden_size),
        (20, cfg.hidden_size),
        (30, cfg.hidden_size),
    ]
    assert by_callbacks == by_task


def test_a_cancelled_exchange_frees_its_key(qwen3_dir: Path) -> None:
    """Cancelled during its link time: no answer is waited for, and the key can be sent again."""
    cfg = load_config(qwen3_dir)

    async def body(plane: DirectPlane) -> tuple[int, ...]:
        first = plane.exchange(_request(cfg, 1))
        await asyncio.sleep(0)  # its first step ran: the link time is charged
        first.cancel()
        await asyncio.sleep(0.1)
        assert not plane._pending
        again = await plane.exchange(_request(cfg, 1))
        return tuple(again.hidden.shape)

    assert run(_session(_transport(qwen3_dir), body))[0] == (50, cfg.hidden_size)


def test_a_key_in_flight_twice_fails_the_second(qwen3_dir: Path) -> None:
    cfg = load_config(qwen3_dir)

    async def body(plane: DirectPlane) -> tuple[int, ...]:
        first = plane.exchange(_request(cfg, 1))
        with pytest.raises(ValueError, match="already waiting"):
            await plane.exchange(_request(cfg, 1))
        return tuple((await first).hidden.shape)

    assert run(_session(_transport(qwen3_dir), body))[0] == (50, cfg.hidden_size)


def test_expert_overlap_off_keeps_the_task(qwen3_dir: Path) -> None:
    cfg = load_config(qwen3_dir)

    async def body(plane: DirectPlane) -> tuple[int, ...]:
        call = plane.exchange(_request(cfg, 1))
        assert isinstance(call, asyncio.Task)
        return tuple((await call).hidden.shape)

    assert run(_session(_transport(qwen3_dir, overlap=False), body))[0] == (50, cfg.hidden_size)


def test_a_full_queue_is_waited_for_by_a_task(qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No room in the expert rank's queue: ``accept`` would wait, so a task runs it; the result comes."""
    cfg = load_config(qwen3_dir)
    monkeypatch.setattr(ExpertExecutor, "has_room", property(lambda self: False))

    async def body(plane: DirectPlane) -> tuple[int, ...]:
        call = plane.exchange(_request(cfg, 1))
        result = await call
        assert not plane._later and not plane._pending
        return tuple(result.hidden.shape)

    assert run(_session(_transport(qwen3_dir), body))[0] == (50, cfg.hidden_size)


def test_an_abandoned_session_cancels_a_callback_reply(qwen3_dir: Path) -> None:
    """The stream goes away while an async chunk computes: its reply (``Reply``) ends cancelled, its
    computation is cancelled, and no answer comes."""
    cfg = load_config(qwen3_dir)

    async def body(plane: DirectPlane) -> None:
        call = plane.exchange(_request(cfg, 1, rows=500))
        session = plane.session
        link = transfer_s(dispatch_bytes(500, cfg.hidden_size, cfg.top_k, 4), H200)
        await asyncio.sleep(link + 1e-9)  # arrived and queued, not computed yet
        (done,) = session._replies
        assert not isinstance(done, asyncio.Task)
        await session.abandon()
        assert done.cancelled() and not session._replies
        await asyncio.sleep(1.0)
        assert not call.done()
        call.cancel()

    run(_session(_transport(qwen3_dir), body))


def test_a_charged_callback_reply_is_no_reference_cycle(qwen3_dir: Path) -> None:
    """An async chunk's answer with its result transfer charged (a timer): once sent, its ``Reply`` is
    freed by reference counting, not left in a cycle for the collector (the fired timer held
    ``Reply.send``)."""
    cfg = load_config(qwen3_dir)

    async def body(plane: DirectPlane) -> tuple[int, ...]:
        result = await plane.exchange(_request(cfg, 1, rows=500))
        await asyncio.sleep(0)  # the reply's ``done`` callbacks have run
        assert not plane.session._replies
        return tuple(result.hidden.shape)

    gc.collect()
    gc.disable()
    try:
        assert run(_session(_transport(qwen3_dir), body))[0] == (500, cfg.hidden_size)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [obj for obj in gc.garbage if isinstance(obj, Reply)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []
