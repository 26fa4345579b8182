"""One long-lived bidirectional gRPC stream from a client to a peer, shared by many requests.

Used where one process talks to a peer over a single stream for its whole life: the scheduler's link to
an attention rank (``Attention.Run``) and an attention rank's link to an expert rank
(``Expert.Exchange``). Both need the same things, and ``DuplexStream`` gives them once:

- the stream is opened on demand (by the first ``open`` after the previous one ended);
- each request registers what it waits for under a key (``expect``); a receiver task routes every answer
  to the waiter of its key, which may take several answers before it is complete (``Collector``);
- when the stream breaks, every waiter fails with ``Unavailable`` at once, naming the peer and the
  reason, and the next ``open`` starts a fresh stream;
- ``close()`` is idempotent; after it, ``open`` raises ``Unavailable``.

The send side needs no bound of its own: every request awaits its answer, so what is queued is bounded by
the requests in flight, and gRPC flow control holds the rest back when the peer is slow.

``Outbox`` is the queue→request-iterator piece on its own, for streams that are not long-lived (the client
SDK's ``prefill_many`` opens one per round).

Nothing here imports grpc: the stream is opened by a callable (a stub method), and the call it returns
need only be async-iterable and cancellable, so tests can drive it with a fake call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

from asap.errors import AsapError, Unavailable

__all__ = ["Collector", "DuplexStream", "Outbox", "Session", "StreamCall"]

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Resp_co = TypeVar("Resp_co", covariant=True)
Resp_contra = TypeVar("Resp_contra", contravariant=True)
T_co = TypeVar("T_co", covariant=True)
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Outbox(Generic[T]):
    """An unbounded queue of messages to send, and the request iterator gRPC reads them from.

    ``put`` queues a message; ``close`` half-closes: the iterator ends once everything queued before it
    was read. Iterate once (it is what the stub's streaming call consumes).
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[T | None] = asyncio.Queue()

    def put(self, message: T) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[T]:
        while (message := await self._queue.get()) is not None:
            yield message


class StreamCall(Protocol[Resp_co]):
    """What a stub's stream-stream call must offer here (``grpc.aio.StreamStreamCall`` does)."""

    def __aiter__(self) -> AsyncIterator[Resp_co]: ...

    def cancel(self) -> bool: ...


class Collector(Protocol[Resp_contra, T_co]):
    """Builds one request's result from the answers routed to its key.

    ``add`` returns True once the result is complete (then ``result()`` is read once); an ``AsapError``
    it raises fails that request only, not the stream.
    """

    def add(self, message: Resp_contra) -> bool: ...

    def result(self) -> T_co: ...


class _Single(Generic[Resp]):
    """The collector of a request answered by exactly one message."""

    __slots__ = ("_message",)

    def __init__(self) -> None:
        self._message: Resp | None = None

    def add(self, message: Resp) -> bool:
        self._message = message
        return True

    def result(self) -> Resp:
        assert self._message is not None  # add() returned True before result() is read
        return self._message


@dataclass(slots=True)
class _Waiter(Generic[Resp]):
    collector: Collector[Resp, Any]
    future: asyncio.Future[Any]
    answered: int = 0


@dataclass(eq=False, slots=True)
class Session(Generic[Req]):
    """One opened stream: where to send on it, and whether it is still the live one."""

    outbox: Outbox[Req]
    alive: bool = True
    """False once the stream ended (broke, or was closed)."""

    def send(self, message: Req) -> None:
        """Queue ``message`` on this stream (dropped by gRPC if the stream has ended)."""
        self.outbox.put(message)


class DuplexStream(Generic[Req, Resp, K]):
    """A long-lived stream whose answers are routed to waiters by key.

    ``open_call(requests)`` starts the stream (a stub's stream-stream method); ``key_of`` gives the key an
    answer belongs to; ``peer`` names the other side in errors (``"expert rank 0 at host:port"``).
    ``on_open`` runs each time a new stream starts; ``on_unmatched(key, message)`` receives answers nobody
    waits for (cancelled or failed requests); ``on_broken(error, failed)`` runs when a stream ends, with
    the number of waiters it failed.
    """

    def __init__(
        self,
        open_call: Callable[[AsyncIterator[Req]], StreamCall[Resp]],
        *,
        key_of: Callable[[Resp], K],
        peer: str,
        name: str = "duplex-rx",
        on_open: Callable[[], None] | None = None,
        on_unmatched: Callable[[K, Resp], None] | None = None,
        on_broken: Callable[[Unavailable, int], None] | None = None,
    ) -> None:
        self.peer = peer
        self._open_call = open_call
        self._key_of = key_of
        self._name = name
        self._on_open = on_open
        self._on_unmatched = on_unmatched
        self._on_broken = on_broken
        self._waiting: dict[K, _Waiter[Resp]] = {}
        self._session: Session[Req] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def is_open(self) -> bool:
        """Whether a stream is live now."""
        return self._session is not None and self._session.alive

    def waiting(self, key: K) -> bool:
        """Whether a request is waiting under ``key``."""
        return key in self._waiting

    def answered(self, key: K) -> int:
        """Answers routed so far to the request waiting under ``key`` (0 once it is gone)."""
        waiter = self._waiting.get(key)
        return waiter.answered if waiter is not None else 0

    def open(self) -> Session[Req]:
        """The live stream, opened now if there is none (no await: nothing can interleave)."""
        if self._closed:
            raise Unavailable(f"{self.peer}: link closed")
        if self._session is not None and self._session.alive:
            return self._session
        session: Session[Req] = Session(Outbox())
        if self._on_open is not None:
            self._on_open()
        call = self._open_call(aiter(session.outbox))
        self._session = session
        self._receiver = asyncio.create_task(self._receive(call, session), name=self._name)
        return session

    @overload
    def expect(self, key: K) -> asyncio.Future[Resp]: ...

    @overload
    def expect(self, key: K, collector: Collector[Resp, T]) -> asyncio.Future[T]: ...

    def expect(self, key: K, collector: Collector[Resp, Any] | None = None) -> asyncio.Future[Any]:
        """Register a request under ``key``; its future gets the collector's result (by default the
        single answer itself). Call ``forget(key)`` when done waiting (in a ``finally``)."""
        if key in self._waiting:
            raise ValueError(f"{self.peer}: a request under key {key!r} is already waiting")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        chosen: Collector[Resp, Any] = collector if collector is not None else _Single()
        self._waiting[key] = _Waiter(chosen, future)
        return future

    def forget(self, key: K) -> None:
        """Stop waiting under ``key`` (later answers for it go to ``on_unmatched``)."""
        self._waiting.pop(key, None)

    async def request(self, key: K, message: Req) -> Resp:
        """Send ``message`` and await the single answer under ``key``."""
        session = self.open()
        future: asyncio.Future[Resp] = self.expect(key)
        session.send(message)
        try:
            return await future
        finally:
            self.forget(key)

    async def _receive(self, call: StreamCall[Resp], session: Session[Req]) -> None:
        reason = "stream closed by the peer"
        try:
            async for message in call:
                self._route(message)
        except asyncio.CancelledError:
            reason = "link closed"
            raise
        except Exception as exc:  # grpc.RpcError and friends: the stream is broken
            reason = _reason_of(exc)
        finally:
            session.alive = False
            error = Unavailable(f"{self.peer}: {reason}")
            waiting, self._waiting = self._waiting, {}
            for waiter in waiting.values():
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            call.cancel()
            if waiting:
                logger.warning("%s; failed %d waiting requests", error.message, len(waiting))
            if self._on_broken is not None:
                self._on_broken(error, len(waiting))

    def _route(self, message: Resp) -> None:
        key = self._key_of(message)
        waiter = self._waiting.get(key)
        if waiter is None:
            if self._on_unmatched is not None:
                self._on_unmatched(key, message)
            return
        waiter.answered += 1
        try:
            complete = waiter.collector.add(message)
        except AsapError as exc:
            self._waiting.pop(key, None)
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return
        if complete:
            self._waiting.pop(key, None)
            if not waiter.future.done():
                waiter.future.set_result(waiter.collector.result())

    async def close(self) -> None:
        """End the stream (half-close, then cancel the receiver); safe to call twice."""
        self._closed = True
        session, receiver = self._session, self._receiver
        self._receiver = None
        if session is not None and session.alive:
            session.outbox.close()
        if receiver is not None:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver


def _reason_of(exc: Exception) -> str:
    """A broken stream's reason: the gRPC details when the error has them (no grpc import here)."""
    if isinstance(exc, AsapError):
        return exc.message
    details = getattr(exc, "details", None)
    if callable(details):
        text = details()
        if text:
            return str(text)
    code = getattr(exc, "code", None)
    if callable(code):
        return str(code())
    return str(exc) or type(exc).__name__
