"""The NIXL plane (WRITEs plus notifications into registered slots, UCX over TCP/shared memory on this CPU
machine): identical outputs to gRPC bytes for every architecture, in process and between processes; a
killed expert rank fails typed (``Unavailable``) within the bound and the other rank keeps serving, a
frozen one fails typed by its missing heartbeats and serving resumes after it thaws; a bad
link announcement is refused with INVALID_ARGUMENT and the rank keeps serving; a malformed descriptor
fails its dispatch only. Skipped where NIXL is not importable."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import grpc
import pytest
import torch

from asap.dataplane.nixl_link import HANDSHAKE_MICRO_BATCH, nixl_missing
from asap.errors import InvalidArgument, Unavailable
from asap.v1 import expert_pb2, expert_pb2_grpc
from attention_svc.server import AttentionService
from tests.dataplane.expert_ranks import HANG_GUARD_S as _HANG_GUARD_S
from tests.dataplane.expert_ranks import dispatch as _dispatch
from tests.dataplane.expert_ranks import expert_processes
from tests.dataplane.expert_ranks import prompt as _prompt
from tests.dataplane.test_services_fast import arch_dir, cluster  # noqa: F401  (arch_dir: a fixture)
from tests.procs import ServiceProcess

pytestmark = pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL")


async def _firsts(
    model: str, plane: str, prompts: list[list[int]]
) -> tuple[list[list[object]], list[int], list[int]]:
    """The first tokens of ``prompts`` run twice (the second batch takes the hot path on a NIXL link:
    the first one connected it), and the dispatches NIXL carried per link, and of those the hot path's."""
    async with cluster(model, plane) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        runs = []
        for _ in range(2):
            outcome = await executor.run_batch(
                [executor.make_prompt(f"p{i}", p, top_logprobs=3) for i, p in enumerate(prompts)]
            )
            runs.append([(o.first.token_id, o.first.logprob, o.first.top_logprobs) for o in outcome.results])  # type: ignore[union-attr]
        carried = [getattr(link.plane, "nixl_exchanges", 0) for link in transport.links]
        direct = [getattr(link.plane, "direct_exchanges", 0) for link in transport.links]
        return runs, carried, direct


async def test_nixl_plane_outputs_match_grpc_bytes(arch_dir: Path) -> None:  # noqa: F811
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 60, 130)]
    via_grpc, none, _ = await _firsts(str(arch_dir), "grpc", prompts)
    via_nixl, carried, direct = await _firsts(str(arch_dir), "nixl", prompts)
    assert via_nixl[0] == via_grpc[0]  # identical first tokens and logprobs
    assert via_nixl[1] == via_grpc[1]  # also on the hot path (compute thread posts and polls)
    assert none == [0, 0] and all(n > 0 for n in carried)  # dispatches really went through NIXL
    assert all(n > 0 for n in direct)  # and the second batch's through the hot path


async def test_auto_keeps_same_host_planes_and_forced_nixl_needs_the_expert(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "auto") as attention:
        assert attention.transport is not None
        assert [link.data_plane for link in attention.transport.links] == ["fast", "fast"]
    with pytest.raises(InvalidArgument, match="does not accept NIXL links"):
        async with cluster(str(qwen3_dir), "nixl", expert_plane="grpc"):
            pass


def _expert_processes(
    model: Path, ranks: int
) -> contextlib.AbstractAsyncContextManager[tuple[AttentionService, list[ServiceProcess]]]:
    return expert_processes(model, ranks, "nixl", expert_plane="nixl")


async def test_between_processes_then_a_killed_expert_fails_typed(qwen3_dir: Path) -> None:
    prompt = _prompt()
    async with cluster(str(qwen3_dir), "grpc") as reference:
        assert reference.executor is not None
        expected = (
            await reference.executor.run_batch([reference.executor.make_prompt("r", prompt)])
        ).results[0]
    async with _expert_processes(qwen3_dir, 2) as (attention, procs):
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        got = (await executor.run_batch([executor.make_prompt("a", prompt, top_logprobs=0)])).results[0]
        assert got.first == expected.first  # same token and logprob across processes
        assert [link.data_plane for link in transport.links] == ["nixl", "nixl"]
        assert all(link.plane.nixl_exchanges > 0 for link in transport.links)  # type: ignore[attr-defined]
        procs[1].kill()
        with pytest.raises(Unavailable):  # the stream break fails the batch at once
            await asyncio.wait_for(executor.run_batch([executor.make_prompt("b", prompt)]), _HANG_GUARD_S)
        live = transport.links[0]
        cfg = executor.part.config
        d = _dispatch(0, 16, cfg.hidden_size, cfg.top_k, expert=0)  # expert 0 lives on rank 0
        result = await asyncio.wait_for(live.exchange(10_000, cfg.moe_layer_ids[0], d), _HANG_GUARD_S)
        assert result.hidden.shape == (16, cfg.hidden_size) and bool(result.hidden.abs().sum() > 0)


async def test_a_frozen_expert_fails_typed_and_serving_resumes(qwen3_dir: Path) -> None:
    async with _expert_processes(qwen3_dir, 1) as (attention, (proc,)):
        executor = attention.executor
        assert executor is not None
        expected = (await executor.run_batch([executor.make_prompt("a", _prompt())])).results[0].first
        os.killpg(proc.proc.pid, signal.SIGSTOP)  # alive, stream open, never answers: only the beats tell
        try:
            with pytest.raises(Unavailable, match="stopped answering"):
                await asyncio.wait_for(
                    executor.run_batch([executor.make_prompt("b", _prompt())]), _HANG_GUARD_S
                )
        finally:
            os.killpg(proc.proc.pid, signal.SIGCONT)
        again = await asyncio.wait_for(
            executor.run_batch([executor.make_prompt("c", _prompt())]), _HANG_GUARD_S
        )
        assert again.results[0].first == expected  # a fresh NIXL link was set up and served


async def test_bad_link_announcements_are_refused_and_the_rank_keeps_serving(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "nixl", experts=1) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        expected = (await executor.run_batch([executor.make_prompt("a", _prompt())])).results[0].first
        good = transport.links[0].plane._end.end.announcement()  # type: ignore[attr-defined]
        bad = [
            expert_pb2.NixlLink(agent="asap-x", metadata=b"garbage", slots_address=4096, memory="DRAM"),
            expert_pb2.NixlLink(),
        ]
        for field, value in (("metadata", b"\x00" * 64), ("agent", "../etc"), ("slot_bytes", 1 << 40)):
            link = expert_pb2.NixlLink()
            link.CopyFrom(good)
            setattr(link, field, value)
            bad.append(link)
        async with grpc.aio.insecure_channel(transport.links[0].target) as channel:
            stub = expert_pb2_grpc.ExpertStub(channel)
            for link in bad:
                call = stub.Exchange()
                await call.write(expert_pb2.DispatchChunk(micro_batch=HANDSHAKE_MICRO_BATCH, nixl_link=link))
                answer = await asyncio.wait_for(call.read(), _HANG_GUARD_S)
                assert answer.error.code == "INVALID_ARGUMENT", (link, answer)
                await call.done_writing()
            info = await stub.Info(expert_pb2.ExpertInfoRequest())
            assert info.nixl_data_plane
        again = (await executor.run_batch([executor.make_prompt("c", _prompt())])).results[0].first
        assert again == expected


async def test_malformed_descriptor_fails_its_dispatch_only(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "nixl", experts=1) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        expected = (await executor.run_batch([executor.make_prompt("a", _prompt())])).results[0].first
        link = transport.links[0]
        cfg = executor.part.config
        bad_layer = max(cfg.num_layers + 5, 99)  # not an MoE layer: the expert refuses its descriptor
        d = _dispatch(0, 4, cfg.hidden_size, cfg.top_k, expert=0)
        with pytest.raises(InvalidArgument, match="not an MoE layer"):
            await asyncio.wait_for(link.exchange(20_000, bad_layer, d), _HANG_GUARD_S)
        again = (await executor.run_batch([executor.make_prompt("b", _prompt())])).results[0].first
        assert again == expected
