"""The OpenAI protocol adapter without a cluster: request parsing, answer writing, the error mapping in
both directions, and the front door's authentication hook (on a fake request path)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from asap.errors import (
    ERRORS_BY_CODE,
    AsapError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from asap.openai_protocol import HTTP_STATUS_BY_CODE, error_from_http, served_model_name
from asap.v1 import common_pb2, scheduler_pb2
from scheduler_svc.http_server import HttpFrontDoor
from scheduler_svc.openai_api import CompletionWriter, HttpError, error_of, parse_completion

MODEL = "tiny"


def _parse(**body: Any) -> Any:
    return parse_completion({"model": MODEL, "max_tokens": 1, **body}, MODEL)


def test_token_ids_text_and_a_batch_of_one_become_the_grpc_request() -> None:
    call = _parse(prompt=[1, 2, 3], logprobs=4, temperature=0.7, seed=9, ttft_slo_ms=500, request_id="r1")
    request = call.prefill
    assert list(request.tokens.ids) == [1, 2, 3] and request.request_id == "r1"
    assert request.sampling.top_logprobs == 4 and request.sampling.seed == 9
    assert request.sampling.temperature == pytest.approx(0.7) and request.ttft_slo_ms == 500
    assert call.logprobs == 4 and not call.stream
    assert _parse(prompt="hi").prefill.text == "hi"
    assert _parse(prompt=["hi"]).prefill.text == "hi"
    assert list(_parse(prompt=[[5, 6]]).prefill.tokens.ids) == [5, 6]


def test_defaults_suit_a_prefill_call() -> None:
    call = parse_completion({"prompt": [1]}, MODEL)  # no model, no max_tokens: the served one, 1
    assert parse_completion({"prompt": [1], "max_tokens": None, "n": None}, MODEL).logprobs is None
    assert call.logprobs is None and call.prefill.sampling.top_logprobs == 0
    assert call.prefill.sampling.temperature == 0.0 and not call.tokens_as_ids


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"max_tokens": 2}, 400, "max_tokens"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": "1"}, 400, "max_tokens"),
        ({"model": "gpt-4"}, 404, "model"),
        ({"n": 2}, 400, "n"),
        ({"logprobs": -1}, 400, "logprobs"),
        ({"logprobs": 21}, 400, "logprobs"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"echo": True}, 400, "echo"),
        ({"seed": -1}, 400, "seed"),
        ({"temperature": "hot"}, 400, "temperature"),
        ({"stream": "yes"}, 400, "stream"),
        ({"prompt": {"text": "x"}}, 400, "prompt"),
        ({"prompt": [True, False]}, 400, "prompt"),
        ({"prompt": [2**40]}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": None}, 400, "prompt"),
        ({"timeout_ms": -5}, 400, "timeout_ms"),
    ],
)
def test_bad_fields_name_themselves(body: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(HttpError) as caught:
        _parse(**{"prompt": [1], **body})
    assert caught.value.status == status and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_an_object_is_400() -> None:
    with pytest.raises(HttpError) as caught:
        parse_completion([1, 2], MODEL)
    assert caught.value.status == 400


def _response() -> scheduler_pb2.PrefillResponse:
    return scheduler_pb2.PrefillResponse(
        request_id="r1", first_token_id=7, first_token_logprob=-0.25, prompt_tokens=3, trace_id="ab",
        top_logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in ((7, -0.25), (9, -2.0))],
    )  # fmt: skip


def test_the_answer_carries_the_token_its_logprobs_and_the_usage() -> None:
    writer = CompletionWriter(MODEL, None)  # no tokenizer: tokens are named by id
    answer = writer.completion(_parse(prompt=[1, 2, 3], logprobs=2), _response())
    (choice,) = answer["choices"]
    assert choice["text"] == "token_id:7" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [-0.25]
    assert choice["logprobs"]["top_logprobs"] == [{"token_id:7": -0.25, "token_id:9": -2.0}]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert answer["model"] == MODEL and answer["object"] == "text_completion"
    assert writer.completion(_parse(prompt=[1]), _response())["choices"][0]["logprobs"] is None


def test_streaming_events_are_the_token_then_the_usage_when_asked() -> None:
    writer = CompletionWriter(MODEL, None)
    assert len(writer.chunks(_parse(prompt=[1], stream=True), _response())) == 1
    events = writer.chunks(
        _parse(prompt=[1], stream=True, stream_options={"include_usage": True}), _response()
    )
    assert events[0]["choices"][0]["text"] == "token_id:7" and events[0]["usage"] is None
    assert events[1]["choices"] == [] and events[1]["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidArgument("x"), 400),
        (ResourceExhausted("x"), 429),
        (Unavailable("x"), 503),
        (DeadlineExceeded("x"), 504),
        (InternalError("x"), 500),
    ],
)
def test_asap_errors_map_to_http_statuses_and_back(error: AsapError, status: int) -> None:
    assert error_of(error).status == status
    assert type(error_from_http(status, "x")) is type(error)


def test_every_mapped_code_reads_back_as_itself() -> None:
    for code, (status, _) in HTTP_STATUS_BY_CODE.items():
        if code in ERRORS_BY_CODE:
            assert error_from_http(status, "m").code == code
    assert isinstance(error_from_http(404, "no such model"), InvalidArgument)


def test_served_model_names() -> None:
    assert served_model_name("tiny") == "tiny"
    assert served_model_name("/models/Qwen3-30B-A3B/") == "Qwen3-30B-A3B"
    assert served_model_name("random:/x/deepseek-v3") == "deepseek-v3"


class FakePath:
    """A request path that answers, or raises the error it is given."""

    def __init__(self) -> None:
        self.error: AsapError | None = None
        self.calls = 0

    async def __call__(
        self, request: scheduler_pb2.PrefillRequest, timeout_s: float | None
    ) -> scheduler_pb2.PrefillResponse:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return _response()


@pytest_asyncio.fixture
async def door() -> AsyncIterator[tuple[str, FakePath]]:
    path = FakePath()
    front = HttpFrontDoor(
        path,
        CompletionWriter(MODEL, None),
        ready=lambda: True,
        model_info=lambda: (4096, {"vocab_size": 256}),
        authorize=lambda header: header == "Bearer sesame",
    )
    port = await front.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", path
    finally:
        await front.stop()
        await front.stop()  # idempotent


async def _call(method: str, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": MODEL, "prompt": [1], "max_tokens": 1} if method == "POST" else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_the_auth_hook_guards_the_api_but_not_health(door: tuple[str, FakePath]) -> None:
    url, path = door
    assert (await _call("POST", f"{url}/v1/completions"))[0] == 401
    status, answer = await _call("GET", f"{url}/v1/models", token="wrong")
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert path.calls == 0
    assert (await _call("GET", f"{url}/health"))[0] == 200
    assert (await _call("POST", f"{url}/v1/completions", token="sesame"))[0] == 200
    assert path.calls == 1


async def test_errors_of_the_request_path_and_of_bugs(door: tuple[str, FakePath]) -> None:
    url, path = door
    path.error = Unavailable("no healthy attention rank")
    status, answer = await _call("POST", f"{url}/v1/completions", token="sesame")
    assert status == 503 and answer["error"]["message"] == "no healthy attention rank"
    path.error = InternalError("an invariant broke")
    assert (await _call("POST", f"{url}/v1/completions", token="sesame"))[0] == 500
    path.error = None
    assert (await _call("POST", f"{url}/v1/completions", token="sesame"))[0] == 200
    assert (await _call("DELETE", f"{url}/v1/models", token="sesame"))[0] == 405
