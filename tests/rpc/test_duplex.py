"""DuplexStream and Outbox: routing by key, failure of everything waiting on a broken stream, reopening,
idempotent close; against a fake call and against a real grpc server on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from asap.errors import InvalidArgument, Unavailable
from asap.rpc.duplex import DuplexStream, Outbox
from tests.waiting import until

_END = object()


class FakeCall:
    """A stream-stream call: records what the client sends, answers what the test pushes."""

    def __init__(self, requests: AsyncIterator[str]) -> None:
        self.sent: list[str] = []
        self.cancelled = False
        self.half_closed = asyncio.Event()
        self._answers: asyncio.Queue[object] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[str]) -> None:
        async for message in requests:
            self.sent.append(message)
        self.half_closed.set()

    def answer(self, message: str) -> None:
        self._answers.put_nowait(message)

    def fail(self, exc: Exception) -> None:
        self._answers.put_nowait(exc)

    def end(self) -> None:
        self._answers.put_nowait(_END)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._answers.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, str)
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        self._reader.cancel()
        return True


class Calls:
    def __init__(self) -> None:
        self.opened: list[FakeCall] = []

    def __call__(self, requests: AsyncIterator[str]) -> FakeCall:
        call = FakeCall(requests)
        self.opened.append(call)
        return call


def _key(message: str) -> str:
    return message.split(":", 1)[0]


class Chunks:
    """Complete after ``n`` answers; an answer ``bad`` fails the request."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.parts: list[str] = []

    def add(self, message: str) -> bool:
        body = message.split(":", 1)[1]
        if body == "bad":
            raise InvalidArgument("bad chunk")
        self.parts.append(body)
        return len(self.parts) == self.n

    def result(self) -> str:
        return "+".join(self.parts)


async def test_request_gets_the_answer_of_its_key() -> None:
    calls = Calls()
    stream: DuplexStream[str, str, str] = DuplexStream(calls, key_of=_key, peer="peer 0")
    first = asyncio.create_task(stream.request("a", "a:ping"))
    second = asyncio.create_task(stream.request("b", "b:ping"))
    assert await until(lambda: len(calls.opened) == 1 and len(calls.opened[0].sent) == 2)
    calls.opened[0].answer("b:two")
    calls.opened[0].answer("a:one")
    assert await first == "a:one"
    assert await second == "b:two"
    assert len(calls.opened) == 1  # one stream for both
    assert not stream.waiting("a")
    await stream.close()


async def test_collector_takes_several_answers_and_its_error_fails_only_its_request() -> None:
    calls = Calls()
    stream: DuplexStream[str, str, str] = DuplexStream(calls, key_of=_key, peer="peer 0")
    session = stream.open()
    whole = stream.expect("a", Chunks(2))
    broken = stream.expect("b", Chunks(2))
    session.send("a:go")
    call = calls.opened[0]
    call.answer("a:x")
    call.answer("b:bad")
    assert await until(lambda: stream.answered("a") == 1)
    assert not whole.done()
    call.answer("a:y")
    assert await whole == "x+y"
    with pytest.raises(InvalidArgument, match="bad chunk"):
        await broken
    assert stream.is_open and session.alive  # a failed request leaves the stream up
    await stream.close()


async def test_unmatched_answers_go_to_the_callback() -> None:
    calls = Calls()
    late: list[tuple[str, str]] = []
    stream: DuplexStream[str, str, str] = DuplexStream(
        calls, key_of=_key, peer="peer 0", on_unmatched=lambda k, m: late.append((k, m))
    )
    stream.open()
    future = stream.expect("a")
    stream.forget("a")
    calls.opened[0].answer("a:late")
    assert await until(lambda: bool(late))
    assert late == [("a", "a:late")]
    assert not future.done()
    await stream.close()


async def test_broken_stream_fails_everything_waiting_at_once_and_reopens() -> None:
    calls = Calls()
    broken: list[tuple[str, int]] = []
    opens: list[int] = []
    stream: DuplexStream[str, str, str] = DuplexStream(
        calls,
        key_of=_key,
        peer="expert rank 3 at h:1",
        on_open=lambda: opens.append(1),
        on_broken=lambda error, n: broken.append((error.message, n)),
    )
    first = stream.open()
    waiters = [stream.expect(k) for k in ("a", "b", "c")]

    class Gone(Exception):
        def details(self) -> str:
            return "socket closed"

    calls.opened[0].fail(Gone())
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert all(str(r) == "expert rank 3 at h:1: socket closed" for r in results)
    assert broken == [("expert rank 3 at h:1: socket closed", 3)]
    assert not first.alive and not stream.is_open
    assert calls.opened[0].cancelled
    second = stream.open()
    assert second is not first and second.alive and len(calls.opened) == 2 and len(opens) == 2
    await stream.close()


async def test_peer_ending_the_stream_fails_waiters_with_unavailable() -> None:
    calls = Calls()
    stream: DuplexStream[str, str, str] = DuplexStream(calls, key_of=_key, peer="rank 1")
    stream.open()
    waiter = stream.expect("a")
    calls.opened[0].end()
    with pytest.raises(Unavailable, match="rank 1: stream closed by the peer"):
        await waiter


async def test_close_is_idempotent_half_closes_and_fails_waiters() -> None:
    calls = Calls()
    stream: DuplexStream[str, str, str] = DuplexStream(calls, key_of=_key, peer="rank 1")
    session = stream.open()
    waiter = stream.expect("a")
    session.send("a:x")
    assert await until(lambda: calls.opened[0].sent == ["a:x"])
    await stream.close()
    await stream.close()
    assert calls.opened[0].half_closed.is_set()
    with pytest.raises(Unavailable, match="link closed"):
        await waiter
    with pytest.raises(Unavailable, match="closed"):
        stream.open()


async def test_expect_twice_under_one_key_is_refused() -> None:
    stream: DuplexStream[str, str, str] = DuplexStream(Calls(), key_of=_key, peer="rank 1")
    stream.expect("a")
    with pytest.raises(ValueError, match="already waiting"):
        stream.expect("a")


async def test_outbox_yields_until_half_closed() -> None:
    outbox: Outbox[int] = Outbox()
    for n in (1, 2, 3):
        outbox.put(n)
    outbox.close()
    outbox.put(4)  # after the half-close: never read
    assert [n async for n in outbox] == [1, 2, 3]


# --- against a real grpc server --------------------------------------------------------------------

_METHOD = "/asap.test.Echo/Chat"


async def _chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
    async for message in requests:
        if message == b"die":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "told to die")
        yield message + b":echo"


async def test_against_a_real_server_answers_and_breaks() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "asap.test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(_chat)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        chat = channel.stream_stream(_METHOD)
        stream: DuplexStream[bytes, bytes, bytes] = DuplexStream(
            lambda requests: chat(requests), key_of=lambda m: m.split(b":")[0], peer="echo"
        )
        assert await stream.request(b"a", b"a") == b"a:echo"
        assert await stream.request(b"b", b"b") == b"b:echo"
        waiter = stream.expect(b"never")
        with pytest.raises(Unavailable, match="echo: told to die"):
            await stream.request(b"die", b"die")
        with pytest.raises(Unavailable, match="told to die"):
            await waiter
        assert await stream.request(b"c", b"c") == b"c:echo"  # a fresh stream
        await stream.close()
        await stream.close()
    finally:
        await channel.close()
        await server.stop(None)
