"""Bad input on every port of live services (an expert rank, an attention rank and a scheduler, in
process, on port 0, the fast plane selected as on one host), fuzzed with hypothesis.

Sent to each port: garbage bytes on the raw HTTP/2 port; valid gRPC frames of garbage protobuf to every
method; messages of the wrong type on each streaming method; one oversized message; malformed dispatch
chunks, region references and fast-link announcements on ``Expert.Exchange``, malformed batch
assignments on ``Attention.Run`` and prompts on ``Scheduler.Prefill``. Every gRPC case must end with a
status code (or a well-formed answer) before its deadline, and after each case the service must still
answer its health check SERVING and, at the end, serve a real request.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asap.client import AsapClient
from asap.rpc.health import check_health
from asap.rpc.server import MAX_MESSAGE_BYTES
from asap.v1 import attention_pb2, common_pb2, expert_pb2, scheduler_pb2
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.server import SchedulerService, SchedulerServiceConfig
from tests.fuzz.conftest import CASES, CRASHES, FUZZ
from tests.fuzz.test_decoders import dispatch_chunks, region_refs

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 10.0
METHODS = {
    "expert": ["/asap.v1.Expert/Info", "/asap.v1.Expert/Exchange"],
    "attention": ["/asap.v1.Attention/Run"],
    "scheduler": [
        "/asap.v1.Scheduler/Prefill",
        "/asap.v1.Scheduler/PrefillStream",
        "/asap.v1.Scheduler/GetClusterState",
    ],
}
STREAMING = {"/asap.v1.Expert/Exchange", "/asap.v1.Attention/Run", "/asap.v1.Scheduler/PrefillStream"}
WRONG_TYPES = [
    scheduler_pb2.PrefillRequest(text="hello"),
    attention_pb2.BatchAssignment(
        batch_id=3, prompts=[attention_pb2.PromptInput(request_id="x", token_ids=[1, 2])]
    ),
    expert_pb2.CombineChunk(micro_batch=1, layer=0, total_rows=1),
    expert_pb2.ExpertInfo(),
    common_pb2.Tensor(dtype=3, shape=[2, 2], data=b"\1" * 16),
]


@dataclass
class Mesh:
    """The services, run on their own event loop in a thread, so the tests can use blocking channels."""

    loop: asyncio.AbstractEventLoop
    addresses: dict[str, str]
    channels: dict[str, grpc.Channel]

    def serving(self, kind: str) -> bool:
        return check_health(self.channels[kind], timeout_s=5.0)[0]


@pytest.fixture(scope="module")
def mesh(qwen3_dir: Path) -> Iterator[Mesh]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-mesh", daemon=True)
    thread.start()
    services: list[Any] = []

    async def start() -> dict[str, str]:
        expert = ExpertService(ExpertServiceConfig(model=str(qwen3_dir)))
        services.append(expert)
        expert_at = await expert.start()
        attention = AttentionService(AttentionServiceConfig(model=str(qwen3_dir), expert_targets=[expert_at]))
        services.append(attention)
        attention_at = await attention.start()
        scheduler = SchedulerService(
            SchedulerServiceConfig(
                model=str(qwen3_dir), attention_targets=[attention_at], port=0, calibrate=False,
                core=SchedulerConfig(cost=AttentionCostModel()),
            )
        )  # fmt: skip
        services.append(scheduler)
        return {"expert": expert_at, "attention": attention_at, "scheduler": await scheduler.start()}

    addresses = asyncio.run_coroutine_threadsafe(start(), loop).result(180)
    channels = {
        k: grpc.insecure_channel(a, options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)])
        for k, a in addresses.items()
    }
    try:
        yield Mesh(loop, addresses, channels)
    finally:
        for channel in channels.values():
            channel.close()

        async def stop() -> None:
            for service in reversed(services):
                await service.stop(grace_s=0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()  # its self-pipe sockets too: left open, the final gc reports an unclosed loop


def _still_serving(mesh: Mesh, kind: str, target: str) -> None:
    if not mesh.serving(kind):
        CRASHES[target] += 1
        raise AssertionError(f"{kind} stopped serving after a {target} case")


def _call(mesh: Mesh, kind: str, method: str, messages: list[bytes]) -> grpc.StatusCode:
    """Send raw ``messages`` to ``method`` (one for a unary method); the status code it ended with."""
    channel = mesh.channels[kind]
    identity = {"request_serializer": None, "response_deserializer": None}
    try:
        if method in STREAMING:
            call = channel.stream_stream(method, **identity)(iter(messages), timeout=CALL_TIMEOUT_S)
            for _ in call:
                pass
        else:
            channel.unary_unary(method, **identity)(messages[0] if messages else b"", timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung on garbage: {exc.details()}"
        return code
    return grpc.StatusCode.OK


ALL_METHODS = [(kind, method) for kind, methods in METHODS.items() for method in methods]


@pytest.mark.parametrize(("kind", "method"), ALL_METHODS)
@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_garbage_protobuf_in_valid_grpc_frames(
    mesh: Mesh, kind: str, method: str, messages: list[bytes]
) -> None:
    CASES[f"{kind} {method.rsplit('/', 1)[1]}: garbage protobuf"] += 1
    _call(mesh, kind, method, messages)
    _still_serving(mesh, kind, "garbage protobuf")


@pytest.mark.parametrize(("kind", "method"), [(k, m) for k, m in ALL_METHODS if m in STREAMING])
@FUZZ
@given(st.lists(st.sampled_from(WRONG_TYPES), min_size=1, max_size=4))
def test_wrong_message_types_on_streaming_methods(
    mesh: Mesh, kind: str, method: str, messages: list[Any]
) -> None:
    CASES[f"{kind} {method.rsplit('/', 1)[1]}: wrong message type"] += 1
    _call(mesh, kind, method, [m.SerializeToString() for m in messages])
    _still_serving(mesh, kind, "wrong message type")


@pytest.mark.parametrize("kind", list(METHODS))
@FUZZ
@given(st.binary(max_size=2000), st.booleans())
def test_garbage_bytes_on_the_raw_port(mesh: Mesh, kind: str, raw: bytes, preface: bool) -> None:
    CASES[f"{kind} raw port: garbage bytes"] += 1
    host, _, port = mesh.addresses[kind].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        if preface:  # past the HTTP/2 connection preface, into frame parsing
            raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + raw
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    _still_serving(mesh, kind, "raw garbage")


@pytest.mark.parametrize("kind", list(METHODS))
def test_an_oversized_message_is_refused_with_resource_exhausted(mesh: Mesh, kind: str) -> None:
    CASES[f"{kind}: oversized message"] += 1
    method = METHODS[kind][0]
    assert _call(mesh, kind, method, [b"\0" * (MAX_MESSAGE_BYTES + 1)]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(mesh, kind, "oversized message")


def _exchange(mesh: Mesh, chunks: list[expert_pb2.DispatchChunk]) -> list[expert_pb2.CombineChunk]:
    stub = mesh.channels["expert"].stream_stream(
        "/asap.v1.Expert/Exchange",
        request_serializer=expert_pb2.DispatchChunk.SerializeToString,
        response_deserializer=expert_pb2.CombineChunk.FromString,
    )
    return list(stub(iter(chunks), timeout=CALL_TIMEOUT_S))


@FUZZ
@given(st.lists(dispatch_chunks(), min_size=1, max_size=3))
def test_malformed_dispatch_chunks_are_answered_with_errors(
    mesh: Mesh, chunks: list[expert_pb2.DispatchChunk]
) -> None:
    CASES["expert Exchange: malformed chunk"] += len(chunks)
    for chunk in chunks:
        chunk.ClearField("step")  # a sync chunk waits at the barrier for participants that never come
        chunk.sync_participants = 0
    answers = _exchange(mesh, chunks)
    assert len(answers) <= len(chunks)
    assert all(a.HasField("error") for a in answers if a.error.code)
    _still_serving(mesh, "expert", "malformed chunk")


@FUZZ
@given(region_refs, st.sampled_from(["shm", "cuda_ipc"]))
def test_bad_region_references_are_answered_with_errors(
    mesh: Mesh, ref: common_pb2.RegionRef, field: str
) -> None:
    CASES["expert Exchange: region reference"] += 1
    chunk = expert_pb2.DispatchChunk(micro_batch=1, layer=0, total_rows=1)
    chunk.hidden.CopyFrom(common_pb2.Tensor(dtype=1, shape=[1, 16]))
    getattr(chunk.hidden, field).CopyFrom(ref)
    chunk.expert_ids.CopyFrom(common_pb2.Tensor(dtype=3, shape=[1, 1], data=b"\0" * 4))
    chunk.weights.CopyFrom(common_pb2.Tensor(dtype=1, shape=[1, 1], data=b"\0" * 4))
    (answer,) = _exchange(mesh, [chunk])
    assert answer.error.code == "INVALID_ARGUMENT", answer.error
    _still_serving(mesh, "expert", "region reference")


@FUZZ
@given(st.text(max_size=60), st.text(max_size=60), st.text(max_size=60))
def test_bad_fast_link_announcements_are_refused(
    mesh: Mesh, region: str, request_bell: str, completion_bell: str
) -> None:
    CASES["expert Exchange: fast-link announcement"] += 1
    chunk = expert_pb2.DispatchChunk(
        fast_link=expert_pb2.FastLink(
            region=region, request_bell=request_bell, completion_bell=completion_bell
        )
    )
    assert _exchange(mesh, [chunk]) == []  # not answered; the rank logs the refusal and goes on
    _still_serving(mesh, "expert", "fast-link announcement")


@FUZZ
@given(
    st.lists(st.integers(-5, 2**31), max_size=6),
    st.integers(0, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "text", "x" * 300]),
)
def test_bad_prompts_and_assignments(
    mesh: Mesh, tokens: list[int], top: int, temperature: float, text: str
) -> None:
    CASES["scheduler Prefill + attention Run: bad prompt"] += 1
    prompt = attention_pb2.PromptInput(
        request_id="fuzz",
        token_ids=[min(t, 2**31 - 1) for t in tokens],
        sampling=common_pb2.SamplingOptions(temperature=temperature, top_logprobs=top),
    )
    assignment = attention_pb2.BatchAssignment(batch_id=1, prompts=[prompt])
    _call(mesh, "attention", "/asap.v1.Attention/Run", [assignment.SerializeToString()])
    request = (
        scheduler_pb2.PrefillRequest(
            tokens=scheduler_pb2.TokenIds(ids=[min(t, 2**31 - 1) for t in tokens]), sampling=prompt.sampling
        )
        if not text
        else scheduler_pb2.PrefillRequest(text=text)
    )
    _call(mesh, "scheduler", "/asap.v1.Scheduler/Prefill", [request.SerializeToString()])
    _still_serving(mesh, "attention", "bad prompt")
    _still_serving(mesh, "scheduler", "bad prompt")


def test_the_mesh_still_serves_real_requests_after_the_fuzzing(mesh: Mesh) -> None:
    async def prefill() -> int:
        async with AsapClient(mesh.addresses["scheduler"], retries=0, timeout_s=30) as client:
            return (await client.prefill(tokens=[1, 2, 3, 4])).prompt_tokens

    assert asyncio.run(prefill()) == 4
    assert not CRASHES
