"""AsapClient and SyncAsapClient against the in-process fake scheduler."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

import asap.client
from asap.client import (
    AsapClient,
    AsapError,
    ClientState,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    PrefillRequestSpec,
    PrefillResult,
    ResourceExhausted,
    Unavailable,
)
from tests.client.fake_scheduler import VOCAB_SIZE, FakeScheduler, FakeSchedulerThread

Fake = tuple[FakeScheduler, str]

JSON_KEYS = {
    "request_id",
    "first_token_id",
    "first_token_logprob",
    "top_logprobs",
    "prompt_tokens",
    "ttft_ms",
    "trace_id",
}


def test_public_exports_are_explicit() -> None:
    assert sorted(asap.client.__all__) == sorted(
        [
            "DEFAULT_TARGET",
            "AsapClient",
            "AsapError",
            "AttentionRankState",
            "ClientState",
            "ClusterState",
            "DeadlineExceeded",
            "InternalError",
            "InvalidArgument",
            "PrefillRequestSpec",
            "PrefillResult",
            "RequestCancelled",
            "ResourceExhausted",
            "SyncAsapClient",
            "TlsConfig",
            "Unauthenticated",
            "Unavailable",
        ]
    )
    for name in asap.client.__all__:
        assert getattr(asap.client, name) is not None
    assert asap.client.InvalidArgument is asap.errors.InvalidArgument


async def test_prefill_by_tokens_returns_every_field(fake: Fake) -> None:
    servicer, target = fake
    async with AsapClient(target) as client:
        result = await client.prefill(
            tokens=[1, 2, 3], top_logprobs=3, temperature=0.5, seed=7, ttft_slo_ms=500
        )
    assert result == PrefillResult(
        request_id=result.request_id,
        first_token_id=6,
        first_token_logprob=-0.5,
        top_logprobs=((6, -0.5), (7, -1.5), (8, -2.5)),
        prompt_tokens=3,
        ttft_ms=12.25,
        queue_ms=1.5,
        attention_rank=1,
        trace_id=f"trace-{result.request_id}",
    )
    assert result.request_id
    (sent,) = servicer.requests
    assert list(sent.tokens.ids) == [1, 2, 3]
    assert sent.request_id == result.request_id
    assert sent.sampling.top_logprobs == 3
    assert sent.sampling.seed == 7
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert sent.ttft_slo_ms == 500


async def test_prefill_by_text_sends_text_and_keeps_request_id(fake: Fake) -> None:
    servicer, target = fake
    async with AsapClient(target) as client:
        result = await client.prefill(text="hello", request_id="req-1")
    assert servicer.requests[0].WhichOneof("prompt") == "text"
    assert servicer.requests[0].text == "hello"
    assert result.request_id == "req-1"
    assert result.prompt_tokens == 5
    assert result.first_token_id == sum(b"hello") % VOCAB_SIZE
    assert result.top_logprobs == ()


def test_to_json_dict_has_exactly_the_documented_keys() -> None:
    result = PrefillResult("r", 4, -0.25, ((4, -0.25), (9, -2.0)), 3, 10.0, 1.0, 0, "t")
    data = result.to_json_dict()
    assert set(data) == JSON_KEYS
    assert data["top_logprobs"] == [[4, -0.25], [9, -2.0]]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tokens": [1], "text": "a"}, "exactly one"),
        ({}, "exactly one"),
        ({"tokens": []}, "empty prompt"),
        ({"text": ""}, "empty prompt"),
        ({"tokens": [1, -2]}, "token id -2"),
        ({"tokens": [1], "temperature": -1.0}, "temperature"),
        ({"tokens": [1], "top_logprobs": -1}, "top_logprobs"),
    ],
)
async def test_bad_input_is_rejected_before_sending(
    fake: Fake, kwargs: dict[str, object], fragment: str
) -> None:
    servicer, target = fake
    async with AsapClient(target) as client:
        with pytest.raises(InvalidArgument, match=fragment):
            await client.prefill(**kwargs)  # type: ignore[arg-type]
    assert servicer.prefill_calls == 0


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, InternalError),
    ],
)
async def test_status_codes_map_to_typed_errors(
    fake: Fake, code: grpc.StatusCode, error_class: type[AsapError]
) -> None:
    servicer, target = fake
    servicer.fail_code, servicer.fail_message = code, "scripted: nope"
    async with AsapClient(target, retries=0) as client:
        with pytest.raises(error_class) as caught:
            await client.prefill(tokens=[1])
    assert type(caught.value) is error_class
    assert not isinstance(caught.value, grpc.RpcError)
    assert caught.value.message == "scripted: nope"
    assert caught.value.code == code.name


async def test_server_side_invalid_argument_names_the_token(fake: Fake) -> None:
    _, target = fake
    async with AsapClient(target) as client:
        with pytest.raises(InvalidArgument, match=r"token id 999 outside vocabulary \[0, 320\)"):
            await client.prefill(tokens=[1, 999])


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
async def test_retryable_errors_are_retried_within_budget(fake: Fake, code: grpc.StatusCode) -> None:
    servicer, target = fake
    servicer.fail_code, servicer.fail_times = code, 2
    async with AsapClient(target, retries=2) as client:
        result = await client.prefill(tokens=[5])
    assert result.first_token_id == 5
    assert servicer.prefill_calls == 3


async def test_retries_give_up_after_the_budget(fake: Fake) -> None:
    servicer, target = fake
    servicer.fail_code, servicer.fail_times = grpc.StatusCode.RESOURCE_EXHAUSTED, 3
    async with AsapClient(target, retries=2) as client:
        with pytest.raises(ResourceExhausted):
            await client.prefill(tokens=[5])
    assert servicer.prefill_calls == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED]
)
async def test_unsafe_errors_are_never_retried(fake: Fake, code: grpc.StatusCode) -> None:
    servicer, target = fake
    servicer.fail_code = code
    async with AsapClient(target, retries=5) as client:
        with pytest.raises(AsapError):
            await client.prefill(tokens=[5])
    assert servicer.prefill_calls == 1


async def test_retries_stop_at_the_overall_timeout(fake: Fake) -> None:
    servicer, target = fake
    servicer.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    async with AsapClient(target, retries=1000, timeout_s=0.4) as client:
        with pytest.raises(ResourceExhausted):
            await client.prefill(tokens=[5])
    assert time.monotonic() - started < 1.5
    assert 1 < servicer.prefill_calls < 1000


async def test_timeout_raises_deadline_exceeded(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_s = 2.0
    started = time.monotonic()
    async with AsapClient(target) as client:
        with pytest.raises(DeadlineExceeded):
            await client.prefill(tokens=[5], timeout_s=0.2)
    assert time.monotonic() - started < 1.5
    assert servicer.prefill_calls == 1


async def test_client_default_timeout_applies(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_s = 2.0
    async with AsapClient(target, timeout_s=0.2) as client:
        assert (await client.cluster_state()).mode == "async"  # not delayed
        with pytest.raises(DeadlineExceeded):
            await client.prefill(tokens=[5])
    assert servicer.prefill_calls == 1


async def test_cancelling_a_call_leaves_the_client_usable(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_s = 5.0
    async with AsapClient(target) as client:
        task = asyncio.create_task(client.prefill(tokens=[5]))
        await asyncio.wait_for(servicer.prefill_started.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        servicer.delay_s = 0.0
        assert (await client.prefill(tokens=[6])).first_token_id == 6


async def test_client_state_machine(fake: Fake) -> None:
    _, target = fake
    client = AsapClient(target)
    states = [client.state]
    assert (await client.prefill(tokens=[1])).first_token_id == 1  # opens lazily
    states.append(client.state)
    with pytest.raises(RuntimeError, match="OPENED"):
        await client.__aenter__()
    await client.aclose()
    await client.aclose()
    states.append(client.state)
    assert states == [ClientState.UNOPENED, ClientState.OPENED, ClientState.CLOSED]
    with pytest.raises(RuntimeError, match="closed"):
        await client.prefill(tokens=[1])
    with pytest.raises(RuntimeError, match="CLOSED"):
        async with client:
            pass


async def test_closing_an_unopened_client_is_fine() -> None:
    client = AsapClient("127.0.0.1:1")
    await client.aclose()
    assert client.state is ClientState.CLOSED
    with pytest.raises(RuntimeError):
        await client.cluster_state()


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_nothing_listening_is_unavailable() -> None:
    started = time.monotonic()
    async with AsapClient(f"127.0.0.1:{_unused_port()}", retries=0, timeout_s=10) as client:
        with pytest.raises(Unavailable):
            await client.prefill(tokens=[1])
    assert time.monotonic() - started < 5


async def test_cluster_state(fake: Fake) -> None:
    _, target = fake
    async with AsapClient(target) as client:
        await client.prefill(tokens=[1])
        state = await client.cluster_state()
    assert (state.mode, state.model_type, state.vocab_size, state.max_prompt_tokens) == (
        "async",
        "qwen3_moe",
        VOCAB_SIZE,
        4096,
    )
    assert [rank.rank for rank in state.attention_ranks] == [0, 1]
    assert state.attention_ranks[1].queued_requests == 1
    assert state.expert_targets == ("127.0.0.1:7000",)
    assert state.completed_requests == 1


async def test_prefill_many_returns_input_order_despite_completion_order(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_per_token_s = 0.02
    lengths = [12, 1, 6, 3]
    async with AsapClient(target) as client:
        results = await client.prefill_many(
            [{"tokens": [1] * n, "request_id": f"r{n}"} for n in lengths[:3]]
            + [PrefillRequestSpec(text="abc", request_id="r3")]
        )
    assert servicer.stream_calls == 1
    assert servicer.completion_order == ["r1", "r3", "r6", "r12"]
    assert [r.request_id for r in results] == ["r12", "r1", "r6", "r3"]
    assert [r.prompt_tokens for r in results] == lengths
    assert results[3].first_token_id == sum(b"abc") % VOCAB_SIZE


async def test_prefill_many_return_exceptions_puts_errors_in_place(fake: Fake) -> None:
    servicer, target = fake
    async with AsapClient(target) as client:
        outcomes = await client.prefill_many(
            [{"tokens": [1]}, {"tokens": [999]}, {"tokens": [3]}], return_exceptions=True
        )
    assert isinstance(outcomes[0], PrefillResult) and outcomes[0].first_token_id == 1
    assert isinstance(outcomes[1], InvalidArgument) and "999" in outcomes[1].message
    assert isinstance(outcomes[2], PrefillResult) and outcomes[2].first_token_id == 3
    assert servicer.stream_calls == 1


async def test_prefill_many_raises_the_first_failure_by_default(fake: Fake) -> None:
    _, target = fake
    async with AsapClient(target) as client:
        with pytest.raises(InvalidArgument, match="999"):
            await client.prefill_many([{"tokens": [1]}, {"tokens": [999]}])
        # the client survives a failed stream
        assert [r.first_token_id for r in await client.prefill_many([{"tokens": [2]}])] == [2]


async def test_prefill_many_resends_refused_items_on_the_stream(fake: Fake) -> None:
    servicer, target = fake
    servicer.fail_code, servicer.fail_times = grpc.StatusCode.RESOURCE_EXHAUSTED, 2
    async with AsapClient(target, retries=2) as client:
        results = await client.prefill_many([{"tokens": [1]}, {"tokens": [2]}, {"tokens": [3]}])
    assert [r.first_token_id for r in results] == [1, 2, 3]
    assert servicer.stream_calls == 1
    assert servicer.prefill_calls == 5


async def test_prefill_many_reopens_a_failed_stream_then_gives_up(fake: Fake) -> None:
    servicer, target = fake
    servicer.stream_abort_code = grpc.StatusCode.UNAVAILABLE
    async with AsapClient(target, retries=1) as client:
        outcomes = await client.prefill_many([{"tokens": [1]}, {"tokens": [2]}], return_exceptions=True)
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes)
    assert servicer.stream_calls == 2


async def test_prefill_many_item_timeout_and_stream_timeout(fake: Fake) -> None:
    servicer, target = fake
    servicer.delay_per_token_s = 0.1
    async with AsapClient(target) as client:
        outcomes = await client.prefill_many(
            [PrefillRequestSpec(tokens=(1,) * 10, timeout_s=0.1), PrefillRequestSpec(tokens=(1,))],
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], DeadlineExceeded)
        assert isinstance(outcomes[1], PrefillResult)
        with pytest.raises(DeadlineExceeded):
            await client.prefill_many([{"tokens": [1] * 10}], timeout_s=0.2)


async def test_prefill_many_validates_everything_before_sending(fake: Fake) -> None:
    servicer, target = fake
    async with AsapClient(target) as client:
        assert await client.prefill_many([]) == []
        with pytest.raises(InvalidArgument, match="duplicate"):
            await client.prefill_many(
                [{"tokens": [1], "request_id": "a"}, {"tokens": [2], "request_id": "a"}]
            )
        with pytest.raises(InvalidArgument, match="exactly one"):
            await client.prefill_many([{"tokens": [1]}, {}])
        with pytest.raises(InvalidArgument, match="promt"):
            await client.prefill_many([{"promt": "typo"}])
    assert servicer.stream_calls == 0


def test_sync_client_from_plain_code(fake_thread: FakeSchedulerThread) -> None:
    with AsapClient.connect_sync(fake_thread.target) as client:
        states = [client.state]
        assert client.prefill(tokens=[4, 5], top_logprobs=1).top_logprobs == ((9, -0.5),)
        assert [r.first_token_id for r in client.prefill_many([{"tokens": [7]}, {"text": "a"}])] == [7, 97]
        assert client.cluster_state().vocab_size == VOCAB_SIZE
        with pytest.raises(InvalidArgument, match="999"):
            client.prefill(tokens=[999])
    states.append(client.state)
    assert states == [ClientState.OPENED, ClientState.CLOSED]
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.prefill(tokens=[1])
    assert fake_thread.fake.prefill_calls == 4


def test_token_ids_checked_as_before_whatever_their_types() -> None:
    """Plain ints pass in one pass; a bool, a float, a negative or too large id is refused, named first
    in prompt order; an int subclass other than bool is accepted (token by token)."""

    class Token(int):
        pass

    assert PrefillRequestSpec(tokens=(0, 5, 2**31 - 1)).tokens == (0, 5, 2**31 - 1)
    assert PrefillRequestSpec(tokens=(Token(3), 4)).tokens == (3, 4)
    for tokens, named in (
        ((1, True, 2), "True"),
        ((1, 2.0), "2.0"),
        ((3, -1, -2), "-1"),
        ((2**31, 0), "2147483648"),
    ):
        with pytest.raises(InvalidArgument, match=rf"token id {named} is not an int"):
            PrefillRequestSpec(tokens=tokens)
