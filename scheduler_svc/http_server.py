"""The scheduler's OpenAI-compatible HTTP front door (aiohttp), on the scheduler's own event loop.

An adapter like the gRPC servicer: parse and check the body (``scheduler_svc.openai_api``), hand the same
``PrefillRequest`` to the same request path the gRPC ``Prefill`` takes (validation, tracing, the core),
write the answer. Routes: ``POST /v1/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health`` (200 only while the cluster serves; always open, like grpc health).

aiohttp won the latency-under-load comparison in benchmarks/README.md and embeds in a running loop
(``AppRunner``) without taking its signals, which stay with the service's lifecycle.

Authentication hook: ``authorize`` gets the ``Authorization`` header (or None) of every ``/v1/`` request
and returns whether to serve it; a refusal is a 401 that reveals nothing else.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from asap.errors import AsapError
from asap.v1 import scheduler_pb2
from scheduler_svc.openai_api import CompletionWriter, HttpError, bad_request, error_of, parse_completion

logger = logging.getLogger(__name__)

PrefillFn = Callable[[scheduler_pb2.PrefillRequest, float | None], Awaitable[scheduler_pb2.PrefillResponse]]
"""The scheduler's request path: a request and its timeout (seconds) -> its answer, or ``AsapError``."""
Authorizer = Callable[[str | None], bool]

HTTP_READY_LINE = "serving openai http at {url}"
"""Printed once bound, before the scheduler's own ready line, so launchers learn a port-0 address."""
MAX_BODY_BYTES = 16 * 1024 * 1024
"""Larger bodies get a 413 before they are read (a 128k-token prompt as ids is ~1 MiB)."""
_JSON = "application/json"


def _error_response(error: HttpError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


class HttpFrontDoor:
    """The HTTP server: ``await start(host, port)`` (port 0 allowed) ... ``await stop()`` (idempotent)."""

    def __init__(
        self,
        prefill: PrefillFn,
        writer: CompletionWriter,
        *,
        ready: Callable[[], bool],
        model_info: Callable[[], tuple[int, dict[str, Any]]],
        authorize: Authorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._prefill = prefill
        self._writer = writer
        self._ready = ready
        self._model_info = model_info
        """(max prompt tokens, cluster facts) for the model card."""
        self._authorize = authorize
        self._ssl = ssl_context
        """HTTPS (mutual TLS, ``TlsConfig.server_ssl_context``) when the cluster runs with TLS."""
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port."""
        # handler_cancellation: a client that hangs up cancels its handler, so its request leaves the
        # scheduler's queue (as a cancelled gRPC call does).
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=self._ssl).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every failure leaves as OpenAI's error object with its status; the server keeps serving."""
        try:
            authorize = self._authorize
            if (
                request.path.startswith("/v1/")
                and authorize
                and not authorize(request.headers.get("Authorization"))
            ):
                raise HttpError(401, "invalid or missing token", type="authentication_error")
            return await handler(request)
        except HttpError as exc:
            return _error_response(exc)
        except AsapError as exc:
            return _error_response(error_of(exc))
        except web.HTTPException as exc:  # aiohttp's own: unknown route 404, 405, 413 too large ...
            if exc.status < 400:
                raise
            return _error_response(HttpError(exc.status, exc.reason, type="invalid_request_error"))
        except Exception:
            logger.exception("HTTP %s %s failed", request.method, request.path)
            return _error_response(HttpError(500, "internal error", type="internal_error"))

    async def _body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = await request.read()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        call = parse_completion(await self._body(request), self._writer.served_model)
        prefill = call.prefill
        traceparent = request.headers.get("traceparent")
        if traceparent:
            prefill.trace.traceparent = traceparent
            prefill.trace.tracestate = request.headers.get("tracestate", "")
        if not prefill.request_id and request.headers.get("X-Request-Id"):
            prefill.request_id = request.headers["X-Request-Id"]
        timeout_s = prefill.timeout_ms / 1e3 if prefill.timeout_ms else None
        response = await self._prefill(prefill, timeout_s)
        if not call.stream:
            return web.json_response(self._writer.completion(call, response))
        # The first token is known before the first byte is sent, so errors above still get a status.
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await stream.prepare(request)
        for event in self._writer.chunks(call, response):
            await stream.write(f"data: {json.dumps(event)}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    async def models(self, request: web.Request) -> web.Response:
        max_model_len, cluster = self._model_info()
        return web.json_response(self._writer.models(self._created, max_model_len, cluster))

    async def health(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.json_response({"status": "ok"}, content_type=_JSON)
        error = HttpError(503, "the cluster is not serving", type="service_unavailable_error")
        return _error_response(error)
