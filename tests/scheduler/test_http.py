"""The OpenAI-compatible HTTP front door on a real cluster (in-process services on port 0): the official
``openai`` client gets what the SDK gets, streaming, every error status, ``/health`` around readiness,
and the service keeps serving after bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio

from asap.bench.sweep import BenchConfig, bench_target
from asap.bench.workload import LengthSpec, WorkloadSpec
from asap.client import AsapClient
from asap.errors import ResourceExhausted
from asap.model.tokenizer import load_tokenizer
from asap.openai_protocol import served_model_name
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.requests import RequestQueue
from scheduler_svc.server import SchedulerService, SchedulerServiceConfig
from tests.waiting import until

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


@dataclasses.dataclass
class Cluster:
    grpc: str
    http: str
    model: str
    scheduler: SchedulerService


def _scheduler(model: str, ranks: list[str], **config: Any) -> SchedulerService:
    return SchedulerService(
        SchedulerServiceConfig(
            model=model,
            attention_targets=ranks,
            port=0,
            http_port=0,
            core=SchedulerConfig(cost=AttentionCostModel()),
            calibrate=False,
            **config,
        )
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(qwen3_dir: Path) -> AsyncIterator[Cluster]:
    model = str(qwen3_dir)
    expert = ExpertService(ExpertServiceConfig(model=model, port=0))
    attention = AttentionService(
        AttentionServiceConfig(model=model, port=0, expert_targets=[await expert.start()])
    )
    scheduler = _scheduler(model, [await attention.start()])
    try:
        address = await scheduler.start()
        assert scheduler.http is not None
        yield Cluster(address, f"http://127.0.0.1:{scheduler.http.port}", served_model_name(model), scheduler)
    finally:
        for service in (scheduler, attention, expert):
            await service.stop(grace_s=0)


def _openai(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0)


async def _post(cluster: Cluster, body: bytes | dict[str, Any], **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": io.BytesIO(body)}
        async with session.post(f"{cluster.http}/v1/completions", headers=headers, **kwargs) as response:
            return response.status, await response.json(content_type=None)


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


def _token_id(name: str) -> int:
    assert name.startswith("token_id:"), name
    return int(name.removeprefix("token_id:"))


async def test_openai_client_gets_the_sdk_first_token_and_logprobs(cluster: Cluster) -> None:
    async with AsapClient(cluster.grpc, retries=0) as sdk:
        expected = await sdk.prefill(tokens=PROMPT, top_logprobs=5)
    async with _openai(cluster) as client:
        answer = await client.completions.create(
            model=cluster.model, prompt=PROMPT, max_tokens=1, logprobs=5,
            extra_body={"return_tokens_as_token_ids": True},
        )  # fmt: skip
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
    assert _token_id(choice.text) == expected.first_token_id
    assert choice.logprobs.token_logprobs == [expected.first_token_logprob]
    top = [(_token_id(name), logprob) for name, logprob in choice.logprobs.top_logprobs[0].items()]
    assert top == list(expected.top_logprobs)
    assert answer.usage is not None and answer.usage.prompt_tokens == len(PROMPT)
    assert answer.model == cluster.model and choice.finish_reason == "length"


async def test_text_prompts_are_tokenised_and_answered_as_text(cluster: Cluster) -> None:
    tokenizer = load_tokenizer(cluster.scheduler.config.model)
    assert tokenizer is not None
    async with AsapClient(cluster.grpc, retries=0) as sdk:
        expected = await sdk.prefill(text="hello world", top_logprobs=2)
    async with _openai(cluster) as client:
        answer = await client.completions.create(model=cluster.model, prompt="hello world", max_tokens=1)
    assert answer.choices[0].text == tokenizer.decode([expected.first_token_id])
    assert answer.choices[0].logprobs is None
    assert answer.usage is not None and answer.usage.prompt_tokens == expected.prompt_tokens


async def test_streaming_sends_the_token_then_the_usage_then_done(cluster: Cluster) -> None:
    async with AsapClient(cluster.grpc, retries=0) as sdk:
        expected = await sdk.prefill(tokens=PROMPT, top_logprobs=1)
    async with _openai(cluster) as client:
        stream = await client.completions.create(
            model=cluster.model, prompt=PROMPT, max_tokens=1, logprobs=1, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_tokens_as_token_ids": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == 2
    assert _token_id(chunks[0].choices[0].text) == expected.first_token_id
    assert chunks[0].choices[0].logprobs is not None
    assert chunks[0].choices[0].logprobs.token_logprobs == [expected.first_token_logprob]
    assert chunks[1].choices == [] and chunks[1].usage is not None
    assert chunks[1].usage.prompt_tokens == len(PROMPT)


async def test_sampling_options_give_the_grpc_results(cluster: Cluster) -> None:
    async with AsapClient(cluster.grpc, retries=0) as sdk:
        expected = await sdk.prefill(tokens=PROMPT, temperature=1.5, seed=11, top_logprobs=3)
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 1.5, "seed": 11, "logprobs": 3,
            "return_tokens_as_token_ids": True}  # fmt: skip
    status, answer = await _post(cluster, body)
    assert status == 200
    assert answer["asap"]["first_token_id"] == expected.first_token_id
    assert answer["choices"][0]["logprobs"]["token_logprobs"] == [expected.first_token_logprob]


async def test_models_lists_the_served_model(cluster: Cluster) -> None:
    async with _openai(cluster) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == [cluster.model]
    status, listing = await _get(f"{cluster.http}/v1/models")
    assert status == 200 and listing["data"][0]["asap"]["vocab_size"] > 0


async def test_traceparent_header_is_honoured(cluster: Cluster) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, answer = await _post(
        cluster, {"prompt": PROMPT, "max_tokens": 1}, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01"
    )
    assert status == 200 and answer["asap"]["trace_id"] == trace_id


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prompt": PROMPT, "max_tokens": 16}, 400, "prefill server"),
        ({"prompt": PROMPT, "max_tokens": 1, "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": PROMPT, "max_tokens": 1, "logprobs": 21}, 400, "logprobs"),
        ({"prompt": PROMPT, "max_tokens": 1, "echo": True}, 400, "echo"),
        ({"prompt": [PROMPT, PROMPT], "max_tokens": 1}, 400, "one prompt"),
        ({"prompt": [], "max_tokens": 1}, 400, "prompt"),
        ({"prompt": [10**6], "max_tokens": 1}, 400, "vocabulary"),
        ({"prompt": [1] * 100_000, "max_tokens": 1}, 400, "exceeds the model's maximum"),
        ({"prompt": PROMPT, "max_tokens": 1, "temperature": -1}, 400, "temperature"),
        ({"prompt": PROMPT, "max_tokens": 1, "timeout_ms": 1}, 504, "deadline"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
    ],
)
async def test_bad_requests_get_openai_errors_and_the_service_keeps_serving(
    cluster: Cluster, body: bytes | dict[str, Any], status: int, words: str
) -> None:
    got, answer = await _post(cluster, body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]
    good, _ = await _post(cluster, {"prompt": PROMPT, "max_tokens": 1})
    assert good == 200


async def test_openai_client_raises_its_typed_errors(cluster: Cluster) -> None:
    async with _openai(cluster) as client:
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt=PROMPT, max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="prefill server"):
            await client.completions.create(model=cluster.model, prompt=PROMPT, max_tokens=2)


async def test_unknown_routes_and_oversized_bodies(cluster: Cluster) -> None:
    status, answer = await _get(f"{cluster.http}/v1/chat")
    assert status == 404 and "error" in answer
    status, answer = await _post(cluster, b"x" * (17 * 1024 * 1024))
    assert status == 413 and "error" in answer


class _FullQueue(RequestQueue):
    """An empty queue that reports itself at its bound, so admission refuses every request."""

    def __init__(self, bound: int) -> None:
        super().__init__()
        self.bound = bound

    def __len__(self) -> int:
        return self.bound


async def test_admission_refusal_is_429_as_grpc_refuses(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = cluster.scheduler.core
    assert core is not None
    monkeypatch.setattr(core, "_queue", _FullQueue(core.config.max_queue_requests))
    status, answer = await _post(cluster, {"prompt": PROMPT, "max_tokens": 1})
    assert status == 429 and answer["error"]["type"] == "rate_limit_error"
    async with AsapClient(cluster.grpc, retries=0) as sdk:
        with pytest.raises(ResourceExhausted):
            await sdk.prefill(tokens=PROMPT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_and_requests_are_503_until_the_cluster_serves(qwen3_dir: Path) -> None:
    model = str(qwen3_dir)
    rank_port = _free_port()
    scheduler = _scheduler(model, [f"127.0.0.1:{rank_port}"], ready_timeout_s=120.0)
    starting = asyncio.create_task(scheduler.start())
    expert = ExpertService(ExpertServiceConfig(model=model, port=0))
    attention: AttentionService | None = None
    try:
        # start() runs in the task above and binds HTTP part-way, before it waits for the rank.
        assert await until(lambda: scheduler.http is not None and bool(scheduler.http.port), timeout_s=60)
        assert scheduler.http is not None
        http = f"http://127.0.0.1:{scheduler.http.port}"
        status, answer = await _get(f"{http}/health")
        assert status == 503 and answer["error"]["type"] == "service_unavailable_error"
        early = Cluster("", http, served_model_name(model), scheduler)
        status, answer = await _post(early, {"prompt": PROMPT, "max_tokens": 1})
        assert status == 503
        attention = AttentionService(
            AttentionServiceConfig(model=model, port=rank_port, expert_targets=[await expert.start()])
        )
        await attention.start()
        await starting
        assert (await _get(f"{http}/health"))[0] == 200
        assert (await _post(early, {"prompt": PROMPT, "max_tokens": 1}))[0] == 200
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        for service in (scheduler, attention, expert):
            if service is not None:
                await service.stop(grace_s=0)


async def test_bench_drives_the_http_front_door_like_the_grpc_one(cluster: Cluster) -> None:
    workload = WorkloadSpec(lengths=LengthSpec.parse("uniform:4,64"), requests=12, warmup=2, seed=3)
    sweeps = {
        protocol: await bench_target(
            target, BenchConfig(workload=workload, rates=[40.0], progress=False, protocol=protocol)
        )
        for protocol, target in (("grpc", cluster.grpc), ("http", cluster.http))
    }
    for sweep in sweeps.values():
        (result,) = sweep.results
        assert (result.requests, result.completed, result.failed) == (12, 12, 0)
    assert sweeps["http"].label == sweeps["grpc"].label == "async"
    assert sweeps["http"].cluster["vocab_size"] == sweeps["grpc"].cluster["vocab_size"]
    assert sweeps["http"].cluster["max_prompt_tokens"] == sweeps["grpc"].cluster["max_prompt_tokens"]
    assert sweeps["http"].results[0].sequence == sweeps["grpc"].results[0].sequence
