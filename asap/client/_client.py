"""``AsapClient``: the asynchronous client of an ASAP scheduler (``asap.v1.Scheduler``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, Unpack, overload

from asap.auth import AUTHORIZATION, bearer
from asap.client._messages import (
    as_spec,
    cluster_state_from_proto,
    new_request_id,
    request_proto,
    result_from_proto,
)
from asap.client._retry import RETRYABLE, Deadline, backoff_s, translate_errors
from asap.client._sync import SyncAsapClient
from asap.client._types import (
    ClientState,
    ClusterState,
    PrefillOptions,
    PrefillRequestSpec,
    PrefillResult,
)
from asap.errors import AsapError, InternalError, InvalidArgument
from asap.rpc.channels import aio_channel
from asap.rpc.duplex import Outbox
from asap.rpc.server import GRPC_OPTIONS
from asap.rpc.status import error_from_wire
from asap.rpc.tls import TlsConfig
from asap.telemetry import setup, spans
from asap.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"


# grpc's default reconnect backoff (1 s, growing) would make an UNAVAILABLE retry fail fast without even
# trying to reach a scheduler that came back; reconnect sooner.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class _StreamItem:
    __slots__ = ("index", "request", "retries_used")

    def __init__(self, index: int, request: Any) -> None:
        self.index = index
        self.request = request
        self.retries_used = 0


class AsapClient:
    """Asynchronous client of an ASAP cluster's scheduler.

    ``timeout_s`` is the default overall deadline of each call (``None``: none), shared by its retries.
    ``retries`` is how many times a call refused with RESOURCE_EXHAUSTED or UNAVAILABLE is sent again,
    with exponential backoff and jitter; other errors are never retried.

    Use it as ``async with AsapClient(target) as client: ...``; a client used without ``async with``
    opens on its first call and must be closed with ``aclose()``. A closed client cannot be reused.
    All failures are ``asap.errors.AsapError`` subclasses; using a closed client is a ``RuntimeError``.

    ``tls`` (a ``TlsConfig``, e.g. ``TlsConfig.from_dir(DIR)`` for what ``asap up --tls DIR`` made) opens
    a mutual-TLS channel; ``token`` is sent as ``authorization: Bearer TOKEN`` on every call (a refused
    one raises ``Unauthenticated``).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = 60.0,
        retries: int = 2,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0 or None, got {timeout_s}")
        if retries < 0:
            raise InvalidArgument(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.tls = tls
        self._metadata: tuple[tuple[str, str], ...] = ((AUTHORIZATION, bearer(token)),) if token else ()
        self._state = ClientState.UNOPENED
        self._channel: Any = None
        self._stub: Any = None

    @classmethod
    def connect_sync(
        cls,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = 60.0,
        retries: int = 2,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> SyncAsapClient:
        """A blocking client for scripts; it runs its own event loop in a background thread."""
        return SyncAsapClient(cls(target, timeout_s=timeout_s, retries=retries, tls=tls, token=token))

    @property
    def state(self) -> ClientState:
        return self._state

    def _open(self) -> None:
        self._channel = aio_channel(self.target, self.tls, _CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)  # type: ignore[no-untyped-call]
        self._state = ClientState.OPENED

    def _ready_stub(self) -> Any:
        if self._state is ClientState.CLOSED:
            raise RuntimeError("this AsapClient is closed; create a new client")
        if self._state is ClientState.UNOPENED:
            self._open()
        return self._stub

    async def __aenter__(self) -> AsapClient:
        if self._state is not ClientState.UNOPENED:
            raise RuntimeError(f"cannot open an AsapClient that is {self._state.name}")
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel, cancelling calls still in flight. Safe to call more than once."""
        channel, self._channel, self._stub = self._channel, None, None
        self._state = ClientState.CLOSED
        if channel is not None:
            await channel.close()

    async def _with_retries(self, attempt: Callable[[float | None], Awaitable[T]], deadline: Deadline) -> T:
        retry = 0
        while True:
            try:
                with translate_errors():
                    return await attempt(deadline.remaining_s())
            except RETRYABLE as exc:
                delay = backoff_s(retry)
                if retry >= self.retries or not deadline.allows(delay):
                    raise
                retry += 1
                logger.debug(
                    "%s: %s; retry %d/%d in %.3fs", self.target, exc.code, retry, self.retries, delay
                )
                await asyncio.sleep(delay)

    async def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        **options: Unpack[PrefillOptions],
    ) -> PrefillResult:
        """Prefill one prompt (exactly one of ``tokens``/``text``) and return its first token.

        Keywords (``PrefillOptions``): ``text``, ``top_logprobs``, ``temperature``, ``seed``,
        ``ttft_slo_ms``, ``request_id``, ``timeout_s``; defaults as in ``PrefillRequestSpec``.
        ``timeout_s`` of ``None`` uses the client's default. Raises ``InvalidArgument`` for a bad prompt
        (checked here where possible, else by the cluster), ``ResourceExhausted``/``Unavailable`` once the
        retries are spent, ``DeadlineExceeded`` when the deadline passes.
        """
        spec = PrefillRequestSpec.from_kwargs(tokens=tokens, **options)
        stub = self._ready_stub()
        sent_id = spec.request_id or new_request_id()
        request = request_proto(spec, sent_id, on_stream=False)

        async def attempt(grpc_timeout_s: float | None) -> PrefillResult:
            response = await stub.Prefill(request, timeout=grpc_timeout_s, metadata=self._metadata)
            if response.HasField("error"):
                raise error_from_wire(response.error)
            return result_from_proto(response, sent_id)

        deadline = Deadline(spec.timeout_s or self.timeout_s)
        if not setup.TRACING_ENABLED:
            spans.inject_into(request.trace)  # the caller's own span, if its process traces
            return await self._with_retries(attempt, deadline)
        from opentelemetry.trace import SpanKind

        attributes: dict[str, str | int] = {spans.REQUEST_ID: sent_id}
        if spec.tokens is not None:
            attributes[spans.TOKENS] = len(spec.tokens)
        with setup.get_tracer().start_as_current_span(
            spans.CLIENT_PREFILL, kind=SpanKind.CLIENT, attributes=attributes
        ):
            spans.inject_into(request.trace)
            return await self._with_retries(attempt, deadline)

    async def cluster_state(self, *, timeout_s: float | None = None) -> ClusterState:
        """The scheduler's view of the cluster (ranks, queues, model, vocabulary size)."""
        stub = self._ready_stub()

        async def attempt(grpc_timeout_s: float | None) -> ClusterState:
            state = await stub.GetClusterState(
                scheduler_pb2.ClusterStateRequest(), timeout=grpc_timeout_s, metadata=self._metadata
            )
            return cluster_state_from_proto(state)

        return await self._with_retries(attempt, Deadline(timeout_s or self.timeout_s))

    @overload
    async def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> list[PrefillResult]: ...

    @overload
    async def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: Literal[True],
    ) -> list[PrefillResult | AsapError]: ...

    async def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> list[PrefillResult] | list[PrefillResult | AsapError]:
        """Prefill many prompts over one ``PrefillStream``; results come back in input order.

        Each request is a ``PrefillRequestSpec`` or a mapping of ``prefill``'s keyword arguments. All of
        them are validated before anything is sent (``InvalidArgument``, also for duplicate request ids).
        ``timeout_s`` (default: the client's) bounds the whole stream; a spec's own ``timeout_s`` bounds
        its request. Items refused with RESOURCE_EXHAUSTED/UNAVAILABLE are re-sent on the stream, and a
        stream that fails with those codes is reopened for the unfinished items, up to ``retries`` times.

        Like ``asyncio.gather``: with ``return_exceptions=False`` the first failure is raised (the stream
        is cancelled, so the other results are lost); with ``True`` a failed item's place in the list
        holds its ``AsapError``.
        """
        specs = [as_spec(item) for item in requests]
        pending: dict[str, _StreamItem] = {}
        for index, spec in enumerate(specs):
            request_id = spec.request_id or new_request_id()
            if request_id in pending:
                raise InvalidArgument(f"duplicate request_id {request_id!r} in prefill_many")
            pending[request_id] = _StreamItem(index, request_proto(spec, request_id, on_stream=True))
        stub = self._ready_stub()
        outcomes: list[PrefillResult | AsapError | None] = [None] * len(specs)
        deadline = Deadline(timeout_s or self.timeout_s)
        stream_retry = 0
        while pending:
            try:
                with translate_errors():
                    await self._stream_round(
                        stub, pending, outcomes, deadline, stop_on_error=not return_exceptions
                    )
            except RETRYABLE as exc:
                delay = backoff_s(stream_retry)
                if stream_retry < self.retries and deadline.allows(delay):
                    stream_retry += 1
                    logger.debug("%s: stream %s; reopening in %.3fs", self.target, exc.code, delay)
                    await asyncio.sleep(delay)
                    continue
                self._fail_all(pending, outcomes, exc)
            except AsapError as exc:
                self._fail_all(pending, outcomes, exc)
            if not return_exceptions:
                for outcome in outcomes:
                    if isinstance(outcome, AsapError):
                        raise outcome
        if any(outcome is None for outcome in outcomes):
            raise InternalError("prefill_many finished with unanswered requests")
        return [outcome for outcome in outcomes if outcome is not None]

    @staticmethod
    def _fail_all(
        pending: dict[str, _StreamItem], outcomes: list[PrefillResult | AsapError | None], error: AsapError
    ) -> None:
        for item in pending.values():
            outcomes[item.index] = error
        pending.clear()

    async def _stream_round(
        self,
        stub: Any,
        pending: dict[str, _StreamItem],
        outcomes: list[PrefillResult | AsapError | None],
        deadline: Deadline,
        *,
        stop_on_error: bool,
    ) -> None:
        """Send every pending request on one stream and record answers until none is pending."""
        outbox: Outbox[Any] = Outbox()
        for queued in pending.values():
            outbox.put(queued.request)

        async def resend_after(delay_s: float, request: Any) -> None:
            await asyncio.sleep(delay_s)
            outbox.put(request)

        resends: set[asyncio.Task[None]] = set()
        call = stub.PrefillStream(aiter(outbox), timeout=deadline.remaining_s(), metadata=self._metadata)
        try:
            async for response in call:
                item = pending.get(response.request_id)
                if item is None:
                    logger.warning(
                        "%s: answer for unknown request %r ignored", self.target, response.request_id
                    )
                    continue
                outcome: PrefillResult | AsapError
                if response.HasField("error"):
                    outcome = error_from_wire(response.error)
                    delay = backoff_s(item.retries_used)
                    if (
                        isinstance(outcome, RETRYABLE)
                        and item.retries_used < self.retries
                        and deadline.allows(delay)
                    ):
                        item.retries_used += 1
                        task = asyncio.create_task(resend_after(delay, item.request))
                        resends.add(task)
                        task.add_done_callback(resends.discard)
                        continue
                else:
                    outcome = result_from_proto(response, response.request_id)
                del pending[response.request_id]
                outcomes[item.index] = outcome
                if stop_on_error and isinstance(outcome, AsapError):
                    return
                if not pending:
                    outbox.close()  # half-close: the scheduler then ends the stream
        finally:
            for task in resends:
                task.cancel()
            call.cancel()  # a no-op once the stream has ended
        if pending:
            raise InternalError(f"scheduler ended the stream with {len(pending)} request(s) unanswered")
