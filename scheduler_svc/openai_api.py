"""The OpenAI completions protocol of the scheduler's HTTP front door, without any HTTP library.

A request body becomes the same ``asap.v1.PrefillRequest`` the gRPC front door receives (so both go through
one validation, one scheduler core and one tracing path), and a ``PrefillResponse`` becomes an OpenAI
``text_completion`` object. This is a prefill server: it answers the first token only, so ``max_tokens``
must be 1 (the call disaggregated-serving proxies send) and ``echo`` must be false.

Errors are ``HttpError`` (an HTTP status and OpenAI's error object); ``error_of`` maps the ASAP error
hierarchy onto statuses through ``asap.openai_protocol`` (INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asap.errors import AsapError
from asap.openai_protocol import TOKEN_ID_PREFIX, http_status_of
from asap.sampling_options import MAX_TOP_LOGPROBS
from asap.v1 import common_pb2, scheduler_pb2

if TYPE_CHECKING:
    from asap.model.tokenizer import PromptTokenizer


class HttpError(Exception):
    """A request that gets an error answer: ``status`` and the fields of OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers errors."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_of(exc: AsapError) -> HttpError:
    """The HTTP answer to an ASAP error (500 for codes without an HTTP meaning of their own)."""
    status, kind = http_status_of(exc.code)
    return HttpError(status, exc.message, type=kind, code=exc.code.lower())


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param=param)


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A parsed ``POST /v1/completions``: the prefill request plus how the answer is to be written."""

    prefill: scheduler_pb2.PrefillRequest
    logprobs: int | None
    """``logprobs: K`` asked for (None: no logprobs object in the answer)."""
    stream: bool
    include_usage: bool
    """``stream_options.include_usage``: a last chunk with the usage."""
    tokens_as_ids: bool
    """Name tokens ``token_id:N`` instead of their text (a byte-level vocabulary has clashing texts)."""


def _int_field(body: dict[str, Any], key: str, default: int | None) -> int | None:
    """``body[key]`` as an integer; absent or null: ``default`` (OpenAI's clients send null for unset)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer, got {value!r}", key)
    return value


def _prompt(prompt: Any, request: scheduler_pb2.PrefillRequest) -> None:
    """Put the prompt (text, token ids, or a batch of exactly one of either) into ``request``."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        request.text = prompt  # empty: the validator says "empty prompt"
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not -(2**31) <= t < 2**31 for t in prompt):
            raise bad_request("token ids must be 32-bit integers", "prompt")
        request.tokens.ids.extend(prompt)
        if not prompt:
            request.ClearField("prompt")  # the validator says "a request needs a prompt"
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad_request(f"one prompt per request, got a batch of {len(prompt)}", "prompt")
    elif prompt is None:
        raise bad_request("a request needs a prompt: text or a list of token ids", "prompt")
    else:
        raise bad_request("prompt must be a string or a list of token ids", "prompt")


def parse_completion(body: Any, served_model: str) -> CompletionCall:
    """Check a completions body and build its ``PrefillRequest``; ``HttpError`` says what is wrong (404
    for another model). What the validator behind checks (vocabulary, length, empty prompt) is left to it."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise HttpError(
            404, f"The model `{model}` does not exist; this server serves `{served_model}`",
            param="model", code="model_not_found",
        )  # fmt: skip
    max_tokens = _int_field(body, "max_tokens", 1)
    if max_tokens != 1:
        raise bad_request(
            f"max_tokens must be 1, got {max_tokens}: this is a prefill server, it answers the first token "
            "only (send the decode to a decode server)",
            "max_tokens",
        )
    if body.get("echo"):
        raise bad_request("echo is not supported: this prefill server returns the first token only", "echo")
    if _int_field(body, "n", 1) != 1 or _int_field(body, "best_of", 1) != 1:
        raise bad_request("n and best_of must be 1", "n")
    logprobs = _int_field(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
    ):
        raise bad_request(f"temperature must be a number, got {temperature!r}", "temperature")
    seed = _int_field(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**64:
        raise bad_request(f"seed must be in [0, 2**64), got {seed}", "seed")
    request = scheduler_pb2.PrefillRequest(
        request_id=str(body.get("request_id") or ""),
        sampling=common_pb2.SamplingOptions(
            temperature=float(temperature), seed=seed or 0, top_logprobs=logprobs or 0
        ),
    )
    _prompt(body.get("prompt"), request)
    for key in ("ttft_slo_ms", "timeout_ms"):  # ASAP's own fields, as in the gRPC request
        value = _int_field(body, key, 0) or 0
        if not 0 <= value < 2**32:
            raise bad_request(f"{key} must be in [0, 2**32), got {value}", key)
        setattr(request, key, value)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad_request("stream must be a boolean and stream_options an object", "stream")
    return CompletionCall(
        prefill=request,
        logprobs=logprobs,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        tokens_as_ids=bool(body.get("return_tokens_as_token_ids", False)),
    )


class CompletionWriter:
    """Writes a ``PrefillResponse`` as OpenAI's completion objects, naming tokens with the model's
    tokenizer (``token_id:N`` without one, or when asked)."""

    def __init__(self, served_model: str, tokenizer: PromptTokenizer | None) -> None:
        self.served_model = served_model
        self.tokenizer = tokenizer

    def token_text(self, token_id: int, as_id: bool) -> str:
        if as_id or self.tokenizer is None:
            return f"{TOKEN_ID_PREFIX}{token_id}"
        return self.tokenizer.decode([token_id])

    def _choice(self, call: CompletionCall, response: scheduler_pb2.PrefillResponse) -> dict[str, Any]:
        text = self.token_text(response.first_token_id, call.tokens_as_ids)
        logprobs = None
        if call.logprobs is not None:
            top: dict[str, float] = {}
            for pair in response.top_logprobs:
                top.setdefault(self.token_text(pair.token_id, call.tokens_as_ids), pair.logprob)
            logprobs = {
                "tokens": [text],
                "token_logprobs": [response.first_token_logprob],
                "top_logprobs": [top],
                "text_offset": [0],
            }
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}

    @staticmethod
    def usage(response: scheduler_pb2.PrefillResponse) -> dict[str, int]:
        prompt = response.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1}

    def _envelope(self, response: scheduler_pb2.PrefillResponse) -> dict[str, Any]:
        return {
            "id": f"cmpl-{response.request_id or secrets.token_hex(8)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served_model,
        }

    def completion(self, call: CompletionCall, response: scheduler_pb2.PrefillResponse) -> dict[str, Any]:
        """The answer to a non-streaming call; ASAP's timings ride along under ``asap``."""
        return {
            **self._envelope(response),
            "choices": [self._choice(call, response)],
            "usage": self.usage(response),
            "asap": {
                "first_token_id": response.first_token_id,
                "first_token_logprob": response.first_token_logprob,
                "queue_ms": response.queue_ms,
                "ttft_ms": response.ttft_ms,
                "attention_rank": response.attention_rank,
                "trace_id": response.trace_id,
            },
        }

    def chunks(self, call: CompletionCall, response: scheduler_pb2.PrefillResponse) -> list[dict[str, Any]]:
        """The events of a streaming call (before ``[DONE]``): the token, then the usage when asked."""
        envelope = self._envelope(response)
        events: list[dict[str, Any]] = [
            {**envelope, "choices": [self._choice(call, response)], "usage": None}
        ]
        if call.include_usage:
            events.append({**envelope, "choices": [], "usage": self.usage(response)})
        return events

    def models(self, created: int, max_model_len: int, cluster: dict[str, Any]) -> dict[str, Any]:
        """``GET /v1/models``: the one served model, with vLLM's ``max_model_len`` and, under ``asap``, what
        a benchmark client needs to know of the cluster (vocabulary size, mode)."""
        card = {
            "id": self.served_model,
            "object": "model",
            "created": created,
            "owned_by": "asap",
            "max_model_len": max_model_len,
            "asap": cluster,
        }
        return {"object": "list", "data": [card]}
