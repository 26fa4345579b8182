"""``AsapClient``: the asynchronous client of an ASAP scheduler (``asap.v1.Scheduler``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc

from asap.client._types import (
    AttentionRankState,
    ClientState,
    ClusterState,
    PrefillRequestSpec,
    PrefillResult,
)
from asap.errors import AsapError, InternalError, InvalidArgument, ResourceExhausted, Unavailable
from asap.rpc.server import GRPC_OPTIONS
from asap.rpc.status import error_from_rpc, error_from_status
from asap.telemetry import setup, spans
from asap.v1 import attention_pb2, scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from asap.client._sync import SyncAsapClient

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"

# Prefill has no side effects, so a request refused at admission or not delivered can be sent again.
# INVALID_ARGUMENT fails again unchanged; DEADLINE_EXCEEDED/CANCELLED mean the caller's budget is gone.
_RETRYABLE: tuple[type[AsapError], ...] = (ResourceExhausted, Unavailable)
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 2.0
_UINT32_MAX = 2**32 - 1

# grpc's default reconnect backoff (1 s, growing) would make an UNAVAILABLE retry fail fast without even
# trying to reach a scheduler that came back; reconnect sooner.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """The one boundary where grpc errors become ``asap.errors`` classes; no ``RpcError`` escapes."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from exc


def backoff_s(retry: int) -> float:
    """Exponential backoff with equal jitter before retry number ``retry`` (0-based)."""
    ceiling = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2.0**retry)
    return ceiling / 2 + random.uniform(0.0, ceiling / 2)


class _Deadline:
    """One overall time budget shared by every attempt of a call."""

    def __init__(self, timeout_s: float | None) -> None:
        self._at = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (the gRPC ``timeout=`` of the next attempt); ``DeadlineExceeded`` when none."""
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise error_from_status("DEADLINE_EXCEEDED", f"deadline of {self._timeout_s}s exceeded")
        return left

    def allows(self, delay_s: float) -> bool:
        """Whether waiting ``delay_s`` still leaves time for another attempt."""
        return self._at is None or time.monotonic() + delay_s < self._at


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _request_proto(spec: PrefillRequestSpec, request_id: str, *, on_stream: bool) -> Any:
    request = scheduler_pb2.PrefillRequest(
        request_id=request_id,
        sampling=attention_pb2.SamplingOptions(
            temperature=spec.temperature,
            seed=spec.seed or 0,
            top_logprobs=spec.top_logprobs,
        ),
        ttft_slo_ms=spec.ttft_slo_ms or 0,
    )
    if spec.tokens is not None:
        request.tokens.ids.extend(spec.tokens)
    elif spec.text is not None:
        request.text = spec.text
    # Unary calls carry their deadline as the gRPC deadline; stream items need it in the message.
    if on_stream and spec.timeout_s is not None:
        request.timeout_ms = min(_UINT32_MAX, max(1, math.ceil(spec.timeout_s * 1000)))
    return request


def _result_from_proto(response: Any, sent_request_id: str) -> PrefillResult:
    return PrefillResult(
        request_id=response.request_id or sent_request_id,
        first_token_id=response.first_token_id,
        first_token_logprob=response.first_token_logprob,
        top_logprobs=tuple((entry.token_id, entry.logprob) for entry in response.top_logprobs),
        prompt_tokens=response.prompt_tokens,
        ttft_ms=response.ttft_ms,
        queue_ms=response.queue_ms,
        attention_rank=response.attention_rank,
        trace_id=response.trace_id,
    )


def _cluster_state_from_proto(state: Any) -> ClusterState:
    return ClusterState(
        mode=state.mode,
        model_type=state.model_type,
        model=state.model,
        attention_ranks=tuple(
            AttentionRankState(
                rank=rank.rank,
                target=rank.target,
                healthy=rank.healthy,
                queued_requests=rank.queued_requests,
                queued_tokens=rank.queued_tokens,
                running_batches=rank.running_batches,
                predicted_load_ms=rank.predicted_load_ms,
            )
            for rank in state.attention_ranks
        ),
        expert_targets=tuple(state.expert_targets),
        pending_requests=state.pending_requests,
        completed_requests=state.completed_requests,
        failed_requests=state.failed_requests,
        vocab_size=state.vocab_size,
        max_prompt_tokens=state.max_prompt_tokens,
    )


def _as_spec(item: PrefillRequestSpec | Mapping[str, Any]) -> PrefillRequestSpec:
    if isinstance(item, PrefillRequestSpec):
        return item
    try:
        return PrefillRequestSpec.from_kwargs(**item)
    except TypeError as exc:
        raise InvalidArgument(f"bad prefill request {dict(item)!r}: {exc}") from None


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
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout_s: float | None = 60.0, retries: int = 2
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0 or None, got {timeout_s}")
        if retries < 0:
            raise InvalidArgument(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self._state = ClientState.UNOPENED
        self._channel: Any = None
        self._stub: Any = None

    @classmethod
    def connect_sync(
        cls, target: str = DEFAULT_TARGET, *, timeout_s: float | None = 60.0, retries: int = 2
    ) -> SyncAsapClient:
        """A blocking client for scripts; it runs its own event loop in a background thread."""
        from asap.client._sync import SyncAsapClient

        return SyncAsapClient(target, timeout_s=timeout_s, retries=retries)

    @property
    def state(self) -> ClientState:
        return self._state

    def _open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=list(_CHANNEL_OPTIONS))
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

    async def _with_retries(self, attempt: Callable[[float | None], Awaitable[T]], deadline: _Deadline) -> T:
        retry = 0
        while True:
            try:
                with translate_errors():
                    return await attempt(deadline.remaining_s())
            except _RETRYABLE as exc:
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
        text: str | None = None,
        top_logprobs: int = 0,
        temperature: float = 0.0,
        seed: int | None = None,
        ttft_slo_ms: int | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        """Prefill one prompt (exactly one of ``tokens``/``text``) and return its first token.

        ``timeout_s`` of ``None`` uses the client's default. Raises ``InvalidArgument`` for a bad prompt
        (checked here where possible, else by the cluster), ``ResourceExhausted``/``Unavailable`` once the
        retries are spent, ``DeadlineExceeded`` when the deadline passes.
        """
        spec = PrefillRequestSpec.from_kwargs(
            tokens=tokens,
            text=text,
            top_logprobs=top_logprobs,
            temperature=temperature,
            seed=seed,
            ttft_slo_ms=ttft_slo_ms,
            request_id=request_id,
            timeout_s=timeout_s,
        )
        stub = self._ready_stub()
        sent_id = spec.request_id or _new_request_id()
        request = _request_proto(spec, sent_id, on_stream=False)

        async def attempt(grpc_timeout_s: float | None) -> PrefillResult:
            response = await stub.Prefill(request, timeout=grpc_timeout_s)
            if response.HasField("error"):
                raise error_from_status(response.error.code, response.error.message)
            return _result_from_proto(response, sent_id)

        deadline = _Deadline(spec.timeout_s or self.timeout_s)
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
            state = await stub.GetClusterState(scheduler_pb2.ClusterStateRequest(), timeout=grpc_timeout_s)
            return _cluster_state_from_proto(state)

        return await self._with_retries(attempt, _Deadline(timeout_s or self.timeout_s))

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
        specs = [_as_spec(item) for item in requests]
        pending: dict[str, _StreamItem] = {}
        for index, spec in enumerate(specs):
            request_id = spec.request_id or _new_request_id()
            if request_id in pending:
                raise InvalidArgument(f"duplicate request_id {request_id!r} in prefill_many")
            pending[request_id] = _StreamItem(index, _request_proto(spec, request_id, on_stream=True))
        stub = self._ready_stub()
        outcomes: list[PrefillResult | AsapError | None] = [None] * len(specs)
        deadline = _Deadline(timeout_s or self.timeout_s)
        stream_retry = 0
        while pending:
            try:
                with translate_errors():
                    await self._stream_round(
                        stub, pending, outcomes, deadline, stop_on_error=not return_exceptions
                    )
            except _RETRYABLE as exc:
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
        deadline: _Deadline,
        *,
        stop_on_error: bool,
    ) -> None:
        """Send every pending request on one stream and record answers until none is pending."""
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        for queued in pending.values():
            outbox.put_nowait(queued.request)

        async def request_stream() -> AsyncIterator[Any]:
            while (request := await outbox.get()) is not None:
                yield request

        async def resend_after(delay_s: float, request: Any) -> None:
            await asyncio.sleep(delay_s)
            outbox.put_nowait(request)

        resends: set[asyncio.Task[None]] = set()
        call = stub.PrefillStream(request_stream(), timeout=deadline.remaining_s())
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
                    outcome = error_from_status(response.error.code, response.error.message)
                    delay = backoff_s(item.retries_used)
                    if (
                        isinstance(outcome, _RETRYABLE)
                        and item.retries_used < self.retries
                        and deadline.allows(delay)
                    ):
                        item.retries_used += 1
                        task = asyncio.create_task(resend_after(delay, item.request))
                        resends.add(task)
                        task.add_done_callback(resends.discard)
                        continue
                else:
                    outcome = _result_from_proto(response, response.request_id)
                del pending[response.request_id]
                outcomes[item.index] = outcome
                if stop_on_error and isinstance(outcome, AsapError):
                    return
                if not pending:
                    outbox.put_nowait(None)  # half-close: the scheduler then ends the stream
        finally:
            for task in resends:
                task.cancel()
            call.cancel()  # a no-op once the stream has ended
        if pending:
            raise InternalError(f"scheduler ended the stream with {len(pending)} request(s) unanswered")
