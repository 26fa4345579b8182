"""``asap up`` end to end: a real local cluster (scheduler, 2 attention, 2 expert ranks) as processes."""

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
from pathlib import Path

import pytest
import torch

from asap.cli import main as cli_main
from asap.client import AsapClient, DeadlineExceeded, InvalidArgument
from asap.model.reference import load_model
from asap.model.sampling import first_token

pytestmark = pytest.mark.slow

_READY = re.compile(r"^ready: scheduler at (\S+)$")


def _children_of(pid: int) -> set[int]:
    """Every live process whose parent is ``pid`` (services run in their own sessions)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


class UpProcess:
    def __init__(self, model_dir: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", ASAP_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asap.cli", "up", "--model", str(model_dir), "--port", "0",
             "--attention", "2", "--experts", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _READY.match(line.strip())
            if match:
                self.address = match.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout_s: float = 180) -> str:
        if not self._ready.wait(timeout_s) or not self.address:
            self.proc.kill()
            raise RuntimeError("asap up did not become ready:\n" + "\n".join(self.lines[-50:]))
        return self.address


@pytest.fixture(scope="module")
def cluster(qwen3_dir: Path) -> Iterator[tuple[str, UpProcess, Path]]:
    up = UpProcess(qwen3_dir)
    try:
        yield up.wait_ready(), up, qwen3_dir
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            up.proc.wait(60)
        if up.proc.stdout is not None:
            up.proc.stdout.close()


def _mixed_prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 300, (count,), generator=g)]
    lengths[0], lengths[1] = 1, 900  # the extremes
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


async def test_fifty_concurrent_requests_equal_the_reference(cluster: tuple[str, UpProcess, Path]) -> None:
    address, _, model_dir = cluster
    prompts = _mixed_prompts(50, seed=3)
    async with AsapClient(address, timeout_s=120) as client:
        results = await asyncio.gather(*(client.prefill(tokens=p, top_logprobs=5) for p in prompts))
        streamed = await client.prefill_many([{"tokens": p, "top_logprobs": 5} for p in prompts[:10]])
    attention, experts = load_model(model_dir)
    reference = [
        first_token(attention.forward([torch.tensor(p)], experts)[0], top_logprobs=5) for p in prompts
    ]
    assert {r.attention_rank for r in results} == {0, 1}, "both attention ranks must serve"
    for prompt, result, expected in zip(prompts, results, reference, strict=True):
        assert result.prompt_tokens == len(prompt)
        assert result.first_token_id == expected.token_id
        assert abs(result.first_token_logprob - expected.logprob) <= 1e-4
        assert [t for t, _ in result.top_logprobs] == [t for t, _ in expected.top_logprobs]
        assert result.ttft_ms >= result.queue_ms >= 0
        assert re.fullmatch(r"[0-9a-f]{32}", result.trace_id)
    for result, expected in zip(streamed, reference[:10], strict=True):
        assert result.first_token_id == expected.token_id


@pytest.mark.parametrize(
    ("request_args", "match"),
    [
        ({"tokens": []}, "empty"),
        ({"tokens": [1, 320]}, "outside the vocabulary"),
        ({"tokens": [1] * 4097}, "exceeds"),
        ({"tokens": [1, 2], "temperature": -1.0}, "temperature"),
        ({"tokens": [1, 2], "top_logprobs": 21}, "top_logprobs"),
        ({"text": ""}, "empty"),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_cluster_keeps_serving(
    cluster: tuple[str, UpProcess, Path], request_args: dict[str, object], match: str
) -> None:
    address, _, _ = cluster
    async with AsapClient(address, retries=0) as client:
        with pytest.raises(InvalidArgument, match=match):
            await client.prefill(**request_args)  # type: ignore[arg-type]
        ok = await client.prefill(text="still serving")
        assert ok.prompt_tokens == len(b"still serving")


async def test_deadline_is_honoured(cluster: tuple[str, UpProcess, Path]) -> None:
    address, _, _ = cluster
    async with AsapClient(address, retries=0) as client:
        with pytest.raises(DeadlineExceeded):
            await client.prefill(tokens=[7] * 4000, timeout_s=0.005)
        state = await client.cluster_state()
        assert state.mode == "async" and len(state.attention_ranks) == 2
        assert all(rank.healthy for rank in state.attention_ranks)


def test_prefill_json_output_matches_the_contract(
    cluster: tuple[str, UpProcess, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _, _ = cluster
    assert cli_main(["prefill", "--target", address, "--json", "--top-logprobs", "3", "hello"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {
        "request_id", "first_token_id", "first_token_logprob", "top_logprobs", "prompt_tokens", "ttft_ms",
        "trace_id",
    }  # fmt: skip
    assert payload["prompt_tokens"] == 5 and len(payload["top_logprobs"]) == 3
    assert all(len(pair) == 2 for pair in payload["top_logprobs"])


def test_sigterm_stops_every_child(cluster: tuple[str, UpProcess, Path]) -> None:
    _, up, _ = cluster
    children = _children_of(up.proc.pid)
    assert len(children) == 5, children  # scheduler + 2 attention + 2 expert
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a child outlived asap up"
    assert any("stopping cluster" in line for line in up.lines)
