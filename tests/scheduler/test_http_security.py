"""The OpenAI HTTP door follows the cluster's security: under TLS it serves HTTPS only to clients with a
certificate from the cluster CA, and with tokens every ``/v1/`` request needs one (401, OpenAI's error
format; ``/health`` stays open) — the same tokens the gRPC door checks."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from asap.bench.http_client import OpenAIHttpClient
from asap.certs import ensure_cluster_certs
from asap.client import AsapClient
from asap.errors import Unauthenticated
from asap.openai_protocol import served_model_name
from asap.rpc.tls import TlsConfig
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.server import SchedulerService, SchedulerServiceConfig

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


async def test_https_and_tokens_on_the_http_door(qwen3_dir: Path, tmp_path: Path) -> None:
    model = str(qwen3_dir)
    ensure_cluster_certs(tmp_path / "tls")
    tls = {role: TlsConfig.from_dir(tmp_path / "tls", role) for role in ("scheduler", "attention", "expert")}
    client_tls = TlsConfig.from_dir(tmp_path / "tls")
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    expert = ExpertService(ExpertServiceConfig(model=model, port=0, tls=tls["expert"]))
    attention = AttentionService(
        AttentionServiceConfig(
            model=model, port=0, expert_targets=[await expert.start()], tls=tls["attention"]
        )
    )
    scheduler = SchedulerService(
        SchedulerServiceConfig(
            model=model,
            attention_targets=[await attention.start()],
            port=0,
            http_port=0,
            core=SchedulerConfig(cost=AttentionCostModel()),
            calibrate=False,
            tls=tls["scheduler"],
            auth_token_file=str(tokens),
        )
    )
    try:
        address = await scheduler.start()
        assert scheduler.http is not None
        url = f"https://localhost:{scheduler.http.port}"
        body = {"model": served_model_name(model), "prompt": PROMPT, "max_tokens": 1, "logprobs": 2}

        # No client certificate: refused in the handshake.
        bare = ssl.create_default_context(cafile=str(client_tls.ca))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.get(f"{url}/health", ssl=bare)
        # Plaintext on the HTTPS port: no answer.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.get(f"http://localhost:{scheduler.http.port}/health")

        good = client_tls.client_ssl_context()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health", ssl=good) as response:
                assert response.status == 200  # open without a token
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with session.post(f"{url}/v1/completions", json=body, ssl=good, headers=headers) as r:
                    assert r.status == 401
                    assert (await r.json())["error"]["type"] == "authentication_error"

        async with OpenAIHttpClient(
            f"localhost:{scheduler.http.port}", tls=client_tls, token="s3cret"
        ) as http:
            answer = await http.prefill(tokens=PROMPT)
        async with AsapClient(address, tls=client_tls, token="s3cret", retries=0) as grpc_client:
            reference = await grpc_client.prefill(tokens=PROMPT)
        async with AsapClient(address, tls=client_tls, retries=0) as tokenless:
            with pytest.raises(Unauthenticated):
                await tokenless.prefill(tokens=PROMPT)
        assert answer.first_token_id == reference.first_token_id
        assert answer.first_token_logprob == pytest.approx(reference.first_token_logprob, abs=1e-6)
    finally:
        for service in (scheduler, attention, expert):
            await service.stop(grace_s=0)
