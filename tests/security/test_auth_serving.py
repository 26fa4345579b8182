"""Bearer tokens on a real server on port 0 (``create_server(auth=...)``, the scheduler's interceptor):
missing, wrong and right tokens on unary and streaming calls, health and reflection open, the refusal
says nothing, reload on SIGHUP, the token in no log line, the server serving after refusals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asap.auth import TokenAuth
from asap.client import AsapClient, TlsConfig, Unauthenticated
from asap.rpc.auth import REFUSED_MESSAGE
from asap.rpc.health import check_health_async
from asap.rpc.server import ServiceHandle, serve_until_signalled
from asap.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.client.fake_scheduler import FakeScheduler, start_fake_scheduler
from tests.waiting import until

TOKEN = "tok-4f1c9a7e-right"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# clients\n{TOKEN}\nother-client-token\n")
    return path


@pytest.fixture
async def served(token_file: Path) -> AsyncIterator[tuple[FakeScheduler, ServiceHandle, str]]:
    fake = FakeScheduler()
    handle, target = await start_fake_scheduler(fake, auth=TokenAuth.from_file(token_file))
    try:
        yield fake, handle, target
    finally:
        await handle.server.stop(None)


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]])
async def test_missing_or_wrong_token_is_unauthenticated_and_nothing_runs(
    served: tuple[FakeScheduler, ServiceHandle, str], token: str | None
) -> None:
    fake, _, target = served
    async with AsapClient(target, token=token, retries=2, timeout_s=10) as client:
        with pytest.raises(Unauthenticated) as refused:
            await client.prefill(tokens=[1, 2, 3])
        assert refused.value.message == REFUSED_MESSAGE  # the same words, whatever was wrong
        with pytest.raises(Unauthenticated):
            await client.prefill_many([{"tokens": [1]}, {"tokens": [2]}])
        with pytest.raises(Unauthenticated):
            await client.cluster_state()
    assert fake.prefill_calls == 0  # never reached the servicer, and never retried


async def test_the_right_token_is_served_after_refusals(
    served: tuple[FakeScheduler, ServiceHandle, str],
) -> None:
    fake, _, target = served
    async with AsapClient(target, token="wrong", retries=0) as bad:
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                await bad.prefill(tokens=[1])
    async with AsapClient(target, token=TOKEN, timeout_s=10) as client:
        assert (await client.prefill(tokens=[1, 2, 3])).first_token_id == 6
        streamed = await client.prefill_many([{"tokens": [1]}, {"tokens": [2, 3]}])
        assert [r.first_token_id for r in streamed] == [1, 5]
        assert (await client.cluster_state()).vocab_size == fake.vocab_size
    async with AsapClient(target, token="other-client-token", timeout_s=10) as other:
        assert (await other.prefill(tokens=[4])).first_token_id == 4


async def test_raw_metadata_forms(served: tuple[FakeScheduler, ServiceHandle, str]) -> None:
    _, _, target = served
    request = scheduler_pb2.PrefillRequest(tokens=scheduler_pb2.TokenIds(ids=[1, 2]))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)  # type: ignore[no-untyped-call]
        for metadata in [(), (("authorization", TOKEN),), (("authorization", f"Basic {TOKEN}"),),
                         (("x-token", TOKEN),)]:  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Prefill(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == REFUSED_MESSAGE
        answer = await stub.Prefill(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
        assert answer.first_token_id == 3


async def test_health_and_reflection_need_no_token(served: tuple[FakeScheduler, ServiceHandle, str]) -> None:
    _, _, target = served
    async with grpc.aio.insecure_channel(target) as channel:
        assert await check_health_async(channel) == (True, "SERVING")
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[no-untyped-call]
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for reply in replies for s in reply.list_services_response.service}
    assert "asap.v1.Scheduler" in names


async def test_tokens_and_tls_together(token_file: Path, tls_dir: Path) -> None:
    handle, target = await start_fake_scheduler(
        FakeScheduler(), tls=TlsConfig.from_dir(tls_dir, "scheduler"), auth=TokenAuth.from_file(token_file)
    )
    try:
        tls = TlsConfig.from_dir(tls_dir)
        async with AsapClient(target, tls=tls, retries=0, timeout_s=10) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.prefill(tokens=[1])
        async with AsapClient(target, tls=tls, token=TOKEN, timeout_s=10) as client:
            assert (await client.prefill(tokens=[2])).first_token_id == 2
    finally:
        await handle.server.stop(None)


async def test_sighup_reloads_the_token_file(
    served: tuple[FakeScheduler, ServiceHandle, str], token_file: Path
) -> None:
    _, handle, target = served
    assert handle.auth is not None
    reloaded = asyncio.Event()
    auth_reload = handle.auth.reload

    def reload_and_tell() -> bool:
        result = auth_reload()
        reloaded.set()
        return result

    handle.auth.reload = reload_and_tell  # type: ignore[method-assign]
    await asyncio.to_thread(token_file.write_text, "rotated-token\n")  # in force once SIGHUP says so
    async with AsapClient(target, token=TOKEN, timeout_s=10) as before:
        assert (await before.prefill(tokens=[1])).first_token_id == 1
    inherited = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup, not only SIG_DFL
    serving = asyncio.create_task(serve_until_signalled(handle, grace_s=0))
    assert await until(lambda: signal.getsignal(signal.SIGHUP) != inherited)  # its handlers are in
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), timeout=10)
        async with AsapClient(target, token=TOKEN, retries=0, timeout_s=10) as old:
            with pytest.raises(Unauthenticated):
                await old.prefill(tokens=[1])
        async with AsapClient(target, token="rotated-token", timeout_s=10) as new:
            assert (await new.prefill(tokens=[1])).first_token_id == 1
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # the handler left with the server


async def test_the_token_appears_in_no_log_line(
    served: tuple[FakeScheduler, ServiceHandle, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, handle, target = served
    assert handle.auth is not None
    with caplog.at_level(logging.DEBUG):
        for token in (TOKEN, "wrong-token-value"):
            async with AsapClient(target, token=token, retries=1, timeout_s=10) as client:
                try:
                    await client.prefill(tokens=[1, 2])
                except Unauthenticated as exc:
                    assert "wrong-token-value" not in str(exc)
        handle.auth.reload()
    assert caplog.records  # the reload logged, at least
    assert TOKEN not in caplog.text and "wrong-token-value" not in caplog.text
