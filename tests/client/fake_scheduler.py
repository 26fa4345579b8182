"""An in-process fake ``asap.v1.Scheduler`` for client tests: deterministic answers, scripted failures.

Answers: the "tokenizer" is UTF-8 bytes; the first token is ``sum(tokens) % vocab_size`` with logprob
-0.5, top logprobs ``(first + i) % vocab_size`` with ``-0.5 - i``; ttft/queue are fixed numbers.
Token ids outside ``[0, vocab_size)`` or an empty prompt are answered with INVALID_ARGUMENT.

Scripting (set attributes before the call under test): ``fail_code``/``fail_message`` fail every
prefill with that status, or only the next ``fail_times`` ones when that is set; ``delay_s`` plus
``delay_per_token_s * len(prompt)`` is how long each prefill takes, so on ``PrefillStream`` long
prompts finish after short ones; ``stream_abort_code`` aborts a whole stream on its first request.
``prefill_calls`` counts prefills started (unary calls and stream items); ``completion_order`` lists
request ids in the order they finished.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import grpc

from asap.auth import TokenAuth
from asap.errors import AsapError, DeadlineExceeded, InvalidArgument
from asap.rpc.server import ServiceHandle, bound_address, create_server
from asap.rpc.status import error_from_status
from asap.rpc.tls import TlsConfig
from asap.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

VOCAB_SIZE = 320
SERVICE_NAME = "asap.v1.Scheduler"


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self) -> None:
        self.vocab_size = VOCAB_SIZE
        self.delay_s = 0.0
        self.delay_per_token_s = 0.0
        self.fail_code: grpc.StatusCode | None = None
        self.fail_message = "scripted failure"
        self.fail_times: int | None = None
        self.stream_abort_code: grpc.StatusCode | None = None
        self.prefill_calls = 0
        self.stream_calls = 0
        self.completion_order: list[str] = []
        self.requests: list[Any] = []
        self._next_id = 0
        self.prefill_started = asyncio.Event()

    def _scripted_failure(self) -> AsapError | None:
        if self.fail_code is None:
            return None
        if self.fail_times is not None:
            if self.fail_times <= 0:
                return None
            self.fail_times -= 1
        return error_from_status(self.fail_code, self.fail_message)

    async def _answer(self, request: Any, timeout_s: float | None) -> Any:
        """The response for one prompt; raises ``AsapError`` for a refused or failed one."""
        self.prefill_calls += 1
        self.prefill_started.set()
        self.requests.append(request)
        request_id = request.request_id or f"fake-{self._next_id}"
        self._next_id += 1
        if (failure := self._scripted_failure()) is not None:
            raise failure
        if request.WhichOneof("prompt") == "text":
            tokens = list(request.text.encode())
        else:
            tokens = list(request.tokens.ids)
        if not tokens:
            raise InvalidArgument("empty prompt")
        for token in tokens:
            if not 0 <= token < self.vocab_size:
                raise InvalidArgument(f"token id {token} outside vocabulary [0, {self.vocab_size})")
        delay = self.delay_s + self.delay_per_token_s * len(tokens)
        if timeout_s is not None and delay > timeout_s:
            await asyncio.sleep(timeout_s)
            raise DeadlineExceeded(f"request {request_id} exceeded {timeout_s}s")
        await asyncio.sleep(delay)
        first = sum(tokens) % self.vocab_size
        k = request.sampling.top_logprobs
        self.completion_order.append(request_id)
        return scheduler_pb2.PrefillResponse(
            request_id=request_id,
            first_token_id=first,
            first_token_logprob=-0.5,
            top_logprobs=[
                common_pb2.TokenLogprob(token_id=(first + i) % self.vocab_size, logprob=-0.5 - i)
                for i in range(k)
            ],
            prompt_tokens=len(tokens),
            queue_ms=1.5,
            ttft_ms=12.25,
            attention_rank=len(tokens) % 2,
            trace_id=f"trace-{request_id}",
        )

    async def Prefill(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self._answer(request, None)
        except AsapError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)

    async def PrefillStream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        self.stream_calls += 1
        answers: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            timeout_s = request.timeout_ms / 1000 if request.timeout_ms else None
            try:
                response = await self._answer(request, timeout_s)
            except AsapError as exc:
                response = scheduler_pb2.PrefillResponse(
                    request_id=request.request_id, error={"code": exc.code, "message": exc.message}
                )
            await answers.put(response)

        async def read_requests() -> None:
            async for request in request_iterator:
                if self.stream_abort_code is not None:
                    await answers.put(self.stream_abort_code)
                    return
                task = asyncio.create_task(answer(request))
                tasks.add(task)
            await asyncio.gather(*tasks)
            await answers.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await answers.get()) is not None:
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "scripted stream failure")
                yield item
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def GetClusterState(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if (failure := self._scripted_failure()) is not None:
            await context.abort(getattr(grpc.StatusCode, failure.code), failure.message)
        return scheduler_pb2.ClusterState(
            mode="async",
            model_type="qwen3_moe",
            model="tiny",
            attention_ranks=[
                scheduler_pb2.AttentionRankState(
                    rank=rank, target=f"127.0.0.1:{6000 + rank}", healthy=True, queued_requests=rank
                )
                for rank in range(2)
            ],
            expert_targets=["127.0.0.1:7000"],
            completed_requests=len(self.completion_order),
            vocab_size=self.vocab_size,
            max_prompt_tokens=4096,
        )


def _registrar(fake: FakeScheduler) -> Callable[[grpc.aio.Server], None]:
    def register(server: grpc.aio.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)  # type: ignore[no-untyped-call]

    return register


async def start_fake_scheduler(
    fake: FakeScheduler, *, tls: TlsConfig | None = None, auth: TokenAuth | None = None
) -> tuple[ServiceHandle, str]:
    """Serve ``fake`` on 127.0.0.1, port 0, on the running loop (with ``create_server``'s ``tls`` and
    ``auth`` when given); returns the handle and its target."""
    handle = await create_server("127.0.0.1:0", _registrar(fake), [SERVICE_NAME], tls=tls, auth=auth)
    await handle.set_serving()
    return handle, bound_address("127.0.0.1:0", handle.port)


class FakeSchedulerThread:
    """The fake served from its own event loop in a thread, for sync code (sync client, CLI)."""

    def __init__(self) -> None:
        self.fake = FakeScheduler()
        self.target = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-scheduler", daemon=True)
        self._handle: ServiceHandle | None = None

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def __enter__(self) -> FakeSchedulerThread:
        self._thread.start()
        self._handle, self.target = self._call(start_fake_scheduler(self.fake))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._call(self._handle.server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
