"""``asap bench --protocol http``: a ``BenchClient`` that speaks the scheduler's OpenAI-compatible HTTP API.

Sends what a disaggregated-serving proxy sends a prefill server (``POST /v1/completions`` with token ids
and ``max_tokens: 1``) over keep-alive connections, and reads the cluster's vocabulary, length limit and
mode from ``GET /v1/models``, so the same workload and report code serve both front doors. An error status
becomes the ASAP error it stands for (``asap.openai_protocol``), so failures count the same as on gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from asap.client import ClusterState, PrefillResult
from asap.errors import DeadlineExceeded, InvalidArgument, Unavailable
from asap.openai_protocol import error_from_http
from asap.rpc.tls import TlsConfig


def base_url(target: str, *, https: bool = False) -> str:
    """``http://HOST:PORT`` (``https`` with TLS) from a ``HOST:PORT`` or URL target (a trailing ``/v1``
    is dropped)."""
    url = target if "://" in target else f"{'https' if https else 'http'}://{target}"
    return url.rstrip("/").removesuffix("/v1")


class OpenAIHttpClient:
    """Prefill over HTTP; ``async with OpenAIHttpClient(target) as client: await client.prefill(...)``."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 60.0,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        self.url = base_url(target, https=tls is not None)
        self.timeout_s = timeout_s
        self._tls = tls
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.model: str | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIHttpClient:
        # No connection limit: the runner's max_in_flight is the one brake, as with gRPC.
        ssl_context = None if self._tls is None else self._tls.client_ssl_context()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context if ssl_context is not None else True),
            headers=self._headers,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise InvalidArgument("use the client inside `async with`")
        return self._session

    async def _json(self, method: str, path: str, timeout_s: float, body: Any = None) -> Any:
        try:
            async with self._open().request(
                method, self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                answer = await response.json(content_type=None)
                if response.status != 200:
                    error = answer.get("error", {}) if isinstance(answer, dict) else {}
                    raise error_from_http(response.status, str(error.get("message", answer)))
                return answer
        except TimeoutError:
            raise DeadlineExceeded(f"{method} {path}: no answer within {timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"{method} {self.url}{path}: {exc}") from exc

    async def cluster_state(self, *, timeout_s: float | None = None) -> ClusterState:
        """What ``GET /v1/models`` says of the served model (its ``asap`` facts: vocabulary, mode)."""
        listing = await self._json("GET", "/v1/models", timeout_s or self.timeout_s)
        card = listing["data"][0]
        facts = card.get("asap", {})
        self.model = str(card["id"])
        return ClusterState(
            mode=str(facts.get("mode", "")),
            model_type=str(facts.get("model_type", "")),
            model=self.model,
            vocab_size=int(facts.get("vocab_size", 0)),
            max_prompt_tokens=int(card.get("max_model_len", 0)),
        )

    async def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        ttft_slo_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        timeout = timeout_s or self.timeout_s
        body: dict[str, Any] = {
            "prompt": list(tokens or ()),
            "max_tokens": 1,
            "timeout_ms": round(timeout * 1e3),
        }
        if self.model is not None:
            body["model"] = self.model
        if ttft_slo_ms:
            body["ttft_slo_ms"] = ttft_slo_ms
        # The server's own deadline is the request's; the client waits a little longer for its answer.
        answer = await self._json("POST", "/v1/completions", timeout + 1.0, body)
        facts = answer["asap"]
        return PrefillResult(
            request_id=str(answer["id"]).removeprefix("cmpl-"),
            first_token_id=int(facts["first_token_id"]),
            first_token_logprob=float(facts["first_token_logprob"]),
            top_logprobs=(),
            prompt_tokens=int(answer["usage"]["prompt_tokens"]),
            ttft_ms=float(facts["ttft_ms"]),
            queue_ms=float(facts["queue_ms"]),
            attention_rank=int(facts["attention_rank"]),
            trace_id=str(facts["trace_id"]),
        )
