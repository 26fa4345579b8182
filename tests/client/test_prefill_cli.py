"""``asap prefill`` through ``asap.cli.main`` against the fake scheduler in a thread."""

from __future__ import annotations

import json
import socket

import grpc
import pytest

from asap.cli import main
from tests.client.fake_scheduler import FakeSchedulerThread

JSON_KEYS = [
    "request_id",
    "first_token_id",
    "first_token_logprob",
    "top_logprobs",
    "prompt_tokens",
    "ttft_ms",
    "trace_id",
]


def test_json_prints_one_object_with_the_documented_keys(
    fake_thread: FakeSchedulerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["prefill", "--target", fake_thread.target, "--tokens", "1,2,3", "--top-logprobs", "2", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") == 1
    data = json.loads(out)
    assert list(data) == JSON_KEYS
    assert data["first_token_id"] == 6
    assert data["top_logprobs"] == [[6, -0.5], [7, -1.5]]
    assert data["prompt_tokens"] == 3
    assert data["trace_id"] == f"trace-{data['request_id']}"
    sent = fake_thread.fake.requests[0]
    assert list(sent.tokens.ids) == [1, 2, 3]
    assert sent.sampling.top_logprobs == 2


def test_text_prompt_human_output_and_env_target(
    fake_thread: FakeSchedulerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASAP_TARGET", fake_thread.target)
    code = main(["prefill", "hi", "--seed", "3", "--ttft-slo-ms", "250"])
    out, _ = capsys.readouterr()
    assert code == 0
    first = sum(b"hi") % 320
    assert out.startswith(f"first token {first} (logprob -0.5000)  prompt 2 tokens  ttft 12.2 ms")
    assert len(out.splitlines()) == 1 + 1 + 5  # summary, table header, default 5 top logprobs
    sent = fake_thread.fake.requests[0]
    assert (sent.text, sent.sampling.seed, sent.ttft_slo_ms) == ("hi", 3, 250)


def test_request_error_names_the_status_and_exits_2(
    fake_thread: FakeSchedulerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["prefill", "--target", fake_thread.target, "--tokens", "1,999", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err == "asap: error: INVALID_ARGUMENT: token id 999 outside vocabulary [0, 320)\n"


def test_refusal_after_retries_exits_2(
    fake_thread: FakeSchedulerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_thread.fake.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = main(["prefill", "--target", fake_thread.target, "--tokens", "1", "--retries", "1"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("asap: error: RESOURCE_EXHAUSTED: ")
    assert fake_thread.fake.prefill_calls == 2


def test_unreachable_target_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(
        ["prefill", "--target", f"127.0.0.1:{port}", "--tokens", "1", "--retries", "0", "--timeout", "5"]
    )
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("asap: error: UNAVAILABLE: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["prefill", "hello", "--tokens", "1"],  # both prompts
        ["prefill"],  # no prompt
        ["prefill", "--tokens", "1,x"],  # not ints
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage: asap prefill" in capsys.readouterr().err


def test_empty_text_is_rejected_client_side(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: the prompt must be rejected before any connection is tried.
    code = main(["prefill", "--target", "127.0.0.1:1", ""])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("asap: error: INVALID_ARGUMENT: empty prompt")
