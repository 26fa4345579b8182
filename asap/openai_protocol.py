"""Facts of the OpenAI-compatible HTTP API that the server (``scheduler_svc.http_server``) and its clients
(``asap bench --protocol http``) share: how ASAP errors map to HTTP statuses and back, how tokens are
named, and what the served model is called. Dependency-free, so clients need neither grpc nor torch.
"""

from __future__ import annotations

from pathlib import Path

from asap.errors import ERRORS_BY_CODE, AsapError, InternalError

TOKEN_ID_PREFIX = "token_id:"
"""How tokens are named with ``return_tokens_as_token_ids`` (vLLM's extension, same spelling)."""

HTTP_STATUS_BY_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
"""ASAP error code -> (HTTP status, OpenAI error ``type``); any other code is a 500 ``internal_error``."""

_CODE_BY_STATUS = {status: code for code, (status, _) in HTTP_STATUS_BY_CODE.items()}


def http_status_of(code: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an ASAP error code."""
    return HTTP_STATUS_BY_CODE.get(code, (500, "internal_error"))


def error_from_http(status: int, message: str) -> AsapError:
    """The ASAP error an HTTP error status stands for (404 and other 4xx: ``InvalidArgument``; INTERNAL for
    the rest)."""
    code = _CODE_BY_STATUS.get(status) or ("INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")
    return ERRORS_BY_CODE.get(code, InternalError)(f"HTTP {status}: {message}")


def served_model_name(model: str) -> str:
    """The default ``model`` name of a ``--model`` spec: ``tiny`` for the built-in model, else the name of
    the checkpoint's directory (``random:DIR`` too), as ``GET /v1/models`` lists it."""
    name = Path(model.removeprefix("random:").rstrip("/")).name
    return name or model
