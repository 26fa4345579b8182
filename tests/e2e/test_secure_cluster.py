"""``asap up --tls DIR --auth-token-file F``: a whole local cluster with mutual TLS on every hop and a
bearer token on the scheduler, serving a prefill; every port refuses plaintext, the scheduler refuses
calls without the token, and ``asap prefill --tls --token-file`` gets through."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from asap.cli import main as cli_main
from asap.client import AsapClient, TlsConfig, Unauthenticated, Unavailable
from asap.model.reference import load_model
from asap.model.sampling import first_token
from asap.rpc.channels import aio_channel
from asap.rpc.health import check_health_async
from asap.v1 import expert_pb2, expert_pb2_grpc
from tests.waiting import until

pytestmark = pytest.mark.slow

TOKEN = "cluster-token-7d3e"
_READY = re.compile(r"^ready: scheduler at (\S+)$")
_CHILD_READY = re.compile(r"^\[(?P<name>[\w-]+)\] serving .+ at (?P<address>\S+)$")


@dataclass
class SecureCluster:
    address: str
    tls_dir: Path
    token_file: Path
    model_dir: Path
    children: dict[str, str]
    """Child name (expert-0, attention-0, scheduler) -> its address."""
    lines: list[str]
    up: subprocess.Popen[str]


@pytest.fixture(scope="module")
def cluster(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    root = tmp_path_factory.mktemp("secure")
    tls_dir, token_file = root / "tls", root / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", ASAP_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asap.cli", "up", "--model", str(qwen3_dir), "--port", "0",
         "--attention", "1", "--experts", "2", "--min-batch-tokens", "0",
         "--tls", str(tls_dir), "--auth-token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()
    found: dict[str, str] = {}

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if child := _CHILD_READY.match(line):
                found[child.group("name")] = child.group("address")
            if match := _READY.match(line):
                found["public"] = match.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(240) or "public" not in found:
            raise RuntimeError("asap up --tls did not become ready:\n" + "\n".join(lines[-50:]))
        yield SecureCluster(found.pop("public"), tls_dir, token_file, qwen3_dir, found, lines, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_prefill_is_served_over_tls_with_the_token(cluster: SecureCluster) -> None:
    prompt = [5, 17, 42, 99, 3]
    async with AsapClient(cluster.address, tls=TlsConfig.from_dir(cluster.tls_dir), token=TOKEN) as client:
        result = await client.prefill(tokens=prompt, top_logprobs=3)
        many = await client.prefill_many([{"tokens": prompt}, {"text": "hello"}])
    attention, experts = load_model(cluster.model_dir)
    expected = first_token(attention.forward([torch.tensor(prompt)], experts)[0], top_logprobs=3)
    assert result.first_token_id == expected.token_id
    assert abs(result.first_token_logprob - expected.logprob) <= 1e-4
    assert many[0].first_token_id == expected.token_id and many[1].prompt_tokens == 5
    assert any("tls: issued scheduler, attention, expert, client" in line for line in cluster.lines)


async def test_no_token_or_no_tls_is_refused_and_the_cluster_keeps_serving(cluster: SecureCluster) -> None:
    tls = TlsConfig.from_dir(cluster.tls_dir)
    async with AsapClient(cluster.address, tls=tls, retries=0) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.prefill(tokens=[1, 2])
    async with AsapClient(cluster.address, token=TOKEN, retries=0, timeout_s=10) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.prefill(tokens=[1, 2])
    async with AsapClient(cluster.address, tls=tls, token=TOKEN) as client:
        assert (await client.prefill(tokens=[1, 2])).prompt_tokens == 2


async def test_every_internal_port_speaks_mutual_tls_only(cluster: SecureCluster) -> None:
    """Attention and expert ports refuse plaintext, so nothing reaches an expert's Exchange stream (where
    shared-memory and fast-plane regions are announced) without a certificate from the cluster's CA."""
    assert {"expert-0", "expert-1", "attention-0", "scheduler"} <= set(cluster.children)
    for name, address in cluster.children.items():
        async with grpc.aio.insecure_channel(address) as plaintext:
            serving, status = await check_health_async(plaintext)
        assert not serving and status.startswith("UNAVAILABLE"), name
        async with aio_channel(address, TlsConfig.from_dir(cluster.tls_dir)) as secure:
            assert await check_health_async(secure) == (True, "SERVING"), name
    async with grpc.aio.insecure_channel(cluster.children["expert-0"]) as plaintext:
        stub = expert_pb2_grpc.ExpertStub(plaintext)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Info(expert_pb2.ExpertInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        announce = expert_pb2.DispatchChunk(fast_link=expert_pb2.FastLink(region="asap-x"))
        call = stub.Exchange(iter([announce]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as exchange:
            await call.read()
        assert exchange.value.code() == grpc.StatusCode.UNAVAILABLE


def test_prefill_cli_with_tls_and_token_file(
    cluster: SecureCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["prefill", "--target", cluster.address, "--tls", str(cluster.tls_dir), "--json", "hello"]
    assert cli_main([*base, "--token-file", str(cluster.token_file)]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 5
    assert cli_main([*base, "--retries", "0"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


async def test_sighup_to_asap_up_reloads_the_schedulers_tokens(cluster: SecureCluster) -> None:
    """Last in this module: it adds a token (the old one stays valid)."""
    await asyncio.to_thread(cluster.token_file.write_text, f"{TOKEN}\nrotated-token-91b2\n")
    tls = TlsConfig.from_dir(cluster.tls_dir)
    async with AsapClient(cluster.address, tls=tls, token="rotated-token-91b2", retries=0) as client:
        with pytest.raises(Unauthenticated):  # not yet: the file is read on SIGHUP only
            await client.prefill(tokens=[1])
        cluster.up.send_signal(signal.SIGHUP)

        async def accepted() -> bool:  # the signal travels asap up -> scheduler; wait for it to land
            try:
                result = await client.prefill(tokens=[1, 2])
            except Unauthenticated:
                return False
            assert result.prompt_tokens == 2
            return True

        if not await until(accepted, timeout_s=30, interval_s=0.1):
            pytest.fail("the scheduler never accepted the token added before SIGHUP")
    assert cluster.up.poll() is None  # asap up handled the signal and runs on
    async with AsapClient(cluster.address, tls=tls, token=TOKEN) as old:
        assert (await old.prefill(tokens=[3])).prompt_tokens == 1
