"""The in-process links without messages (``DirectPlane``) and the attention rank's transport over them
(``DirectExpertTransport``): a dispatch, after its modelled link time, goes straight to the expert
rank's ``ExchangeSession.accept``, and the answer comes back as the result tensor (``_Answer``), not
a ``CombineChunk``. The transports that carry the services' messages are in ``asap.sim.transport``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from asap.dataplane.plane import ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest
from asap.emulation.clock import charge
from asap.rpc.status import error_from_wire
from asap.sim.transport import PerRankPlanes, close_each, in_process_links
from asap.v1 import expert_pb2
from asap.wire.chunks import Dispatch, dispatch_bytes
from expert_svc.reply import run_now

if TYPE_CHECKING:
    from expert_svc.core import ExpertResult
    from expert_svc.exchange import ExchangeSession, ExpertExchange

__all__ = ["DirectExpertTransport", "DirectPlane"]


class _Answer:
    """A computed chunk's answer as the in-process plane takes it: the result tensor, no message."""

    __slots__ = ("barrier_ns", "hidden", "key")

    def __init__(self, key: ExchangeKey, hidden: torch.Tensor, barrier_ns: int) -> None:
        self.key = key
        self.hidden = hidden
        self.barrier_ns = barrier_ns


def _answer(dispatch: Dispatch, result: ExpertResult, barrier_ns: int) -> _Answer:
    """The expert session's ``answer`` hook for the in-process plane (replaces the ``CombineChunk``)."""
    return _Answer((dispatch.micro_batch, dispatch.layer), result.hidden, barrier_ns)


class DirectPlane:
    """One attention -> expert link in process without messages: a dispatch, after its modelled link
    time, goes to the expert rank's ``ExchangeSession.accept`` as a ``chunks.Dispatch`` of the attention
    rank's own (shape-only) tensors, and the answer comes back through this plane's ``put`` as the
    result tensor. Everything in between is the expert service's code (barrier, queue, merging,
    expert-overlap lock, result link time); only the protobuf chunks and the stream's queue and task
    hops are gone. One chunk per dispatch, as the ``grpc`` plane sends shape-only rows.

    ``exchange`` returns a future, not a coroutine: its steps are plain loop callbacks (``_send``,
    ``_arrive``, the answer's delivery) scheduled in the very loop iterations, and in the same order,
    in which a task running the coroutine (``_exchange``) would take them, so results and event counts
    do not move; only the task (its creation, its steps, its wake-ups) is gone. Expert-overlap off,
    where ``accept`` waits for the serial lock and computes inline, takes the task."""

    name = "direct"
    put_never_waits = True
    """``put`` returns without waiting (``expert_svc.exchange.Answers``)."""
    charge_empty = False
    """Charge ``link_s(0)`` for a dispatch of no rows too (``asap.sim.hostcost``: a rank that sends empty
    dispatches still runs the layer's host control path; off, an empty dispatch leaves at once)."""

    def __init__(self, spec: LinkSpec, session: ExchangeSession) -> None:
        self.spec = spec
        self.session = session
        self._waiting: dict[ExchangeKey, asyncio.Future[_Answer]] = {}
        """The task path's (``_exchange``) answers."""
        self._pending: dict[ExchangeKey, asyncio.Future[ExchangeResult]] = {}
        """The callback path's exchanges, by key, until their answer comes (or they fail)."""
        self._accepting = False
        """In ``accept`` of a callback-path dispatch: an answer now (a rejected chunk) is delivered in
        this step, as the task would return it at once."""
        self._later: set[asyncio.Task[None]] = set()

    def exchange(self, request: PlaneRequest) -> asyncio.Future[ExchangeResult]:
        """Send ``request``; the future is its result (``DataPlane.exchange``), or the exchange's error."""
        loop = asyncio.get_running_loop()
        if not self.session.shared.overlap:
            return loop.create_task(self._exchange(request))
        key = request.key
        future: asyncio.Future[ExchangeResult] = loop.create_future()
        if self._in_flight(key):
            future.set_exception(self._twice(key))
            return future
        self._pending[key] = future
        loop.call_soon(self._send, future, request)  # a task's first step
        return future

    def _in_flight(self, key: ExchangeKey) -> bool:
        pending = self._pending.get(key)
        return key in self._waiting or (pending is not None and not pending.done())

    def _twice(self, key: ExchangeKey) -> ValueError:
        return ValueError(
            f"expert rank {self.spec.expert_rank}: a request under key {key!r} is already waiting"
        )

    def _send(self, future: asyncio.Future[ExchangeResult], request: PlaneRequest) -> None:
        """The first step: the dispatch's link time (a timer, then the step that follows it: as
        ``charge`` and the task's wake-up), or ``_arrive`` now."""
        if future.done():  # cancelled before it started
            self._forget(request.key, future)
            return
        try:
            rows = request.rows
            link_s = self.spec.link_s
            if link_s is not None and (rows or self.charge_empty):
                top_k = int(request.dispatch.expert_ids.shape[1])
                nbytes = dispatch_bytes(rows, self.spec.hidden_size, top_k, self.spec.dtype.itemsize)
                seconds = link_s(nbytes if rows else 0)
                loop = future.get_loop()
                if seconds > 0:  # ``charge``: its timer, then the task's wake-up one iteration later
                    loop.call_at(loop.time() + seconds, loop.call_soon, self._arrive, future, request)
                else:  # ``asyncio.sleep(0)``: one iteration
                    loop.call_soon(self._arrive, future, request)
                return
        except Exception as exc:
            self._fail(future, request.key, exc)
            return
        self._arrive(future, request)

    def _arrive(self, future: asyncio.Future[ExchangeResult], request: PlaneRequest) -> None:
        """The dispatch reached the expert rank: its ``accept`` (which does not wait with expert-overlap
        on and room in the rank's queue; without room, a task finishes it)."""
        key = request.key
        if future.done():  # cancelled during the link time
            self._forget(key, future)
            return
        try:
            chunk = self._chunk(request)
            if not self.session.shared.executor.has_room:
                task = future.get_loop().create_task(self._accept_waiting(future, chunk, request))
                self._later.add(task)
                task.add_done_callback(self._later.discard)
                return
            self._accepting = True
            try:
                run_now(self.session.accept(chunk, self))
            finally:
                self._accepting = False
            request.sent()
        except Exception as exc:
            self._fail(future, key, exc)

    async def _accept_waiting(
        self, future: asyncio.Future[ExchangeResult], chunk: Dispatch, request: PlaneRequest
    ) -> None:
        """``_arrive``'s ``accept`` when it waits for room in the expert rank's queue."""
        try:
            await self.session.accept(chunk, self)
            request.sent()
        except Exception as exc:
            self._fail(future, request.key, exc)

    def _fail(self, future: asyncio.Future[ExchangeResult], key: ExchangeKey, exc: BaseException) -> None:
        self._forget(key, future)
        if not future.done():
            future.set_exception(exc)

    def _forget(self, key: ExchangeKey, future: asyncio.Future[ExchangeResult]) -> None:
        if self._pending.get(key) is future:
            del self._pending[key]

    def _chunk(self, request: PlaneRequest) -> Dispatch:
        dispatch = request.dispatch
        return Dispatch(
            micro_batch=request.micro_batch,
            layer=request.layer,
            attention_rank=self.spec.attention_rank,
            row_offset=0,
            total_rows=request.rows,
            hidden=dispatch.hidden,
            expert_ids=_as(dispatch.expert_ids, torch.int32),
            weights=_as(dispatch.weights, torch.float32),
            traceparent=request.traceparent,
            tracestate=request.tracestate,
            sent_unix_nanos=time.time_ns(),
            sync=request.sync,
            counted=dispatch.counted,
        )

    async def _exchange(self, request: PlaneRequest) -> ExchangeResult:
        """``exchange`` as a coroutine (expert-overlap off: ``accept`` may wait)."""
        key = request.key
        if self._in_flight(key):
            raise self._twice(key)
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            link_s = self.spec.link_s
            rows = request.rows
            if link_s is not None and (rows or self.charge_empty):
                top_k = int(request.dispatch.expert_ids.shape[1])
                nbytes = dispatch_bytes(rows, self.spec.hidden_size, top_k, self.spec.dtype.itemsize)
                await charge(link_s(nbytes if rows else 0))
            await self.session.accept(self._chunk(request), self)
            request.sent()
            answer = await future
            return ExchangeResult(answer.hidden, answer.barrier_ns)
        finally:
            self._waiting.pop(key, None)

    async def put(self, item: _Answer | expert_pb2.CombineChunk | None) -> None:
        """The session's answer for one chunk (``expert_svc.exchange.Answers``): a result, or an error
        message as the expert rank answers a chunk it rejected or failed to compute."""
        if item is None:
            return
        answer = isinstance(item, _Answer)
        key = item.key if isinstance(item, _Answer) else (item.micro_batch, item.layer)
        pending = self._pending.pop(key, None)
        if pending is not None:
            if pending.done():  # cancelled meanwhile
                return
            result: ExchangeResult | None = None
            error: BaseException | None = None
            if isinstance(item, _Answer):
                result = ExchangeResult(item.hidden, item.barrier_ns)
            else:
                error = _chunk_error(item)
            if self._accepting:  # answered in ``accept``: the task would have returned in this step
                _resolve(pending, result, error)
            else:  # the task's wake-up, then its return: one iteration later
                pending.get_loop().call_soon(_resolve, pending, result, error)
            return
        if answer:
            assert isinstance(item, _Answer)
            future = self._waiting.get(item.key)
            if future is not None and not future.done():
                future.set_result(item)
            return
        assert isinstance(item, expert_pb2.CombineChunk)
        waiting = self._waiting.get(key)
        if waiting is not None and not waiting.done():
            waiting.set_exception(_chunk_error(item))

    async def close(self) -> None:
        await self.session.abandon()
        self.session.close()


def _chunk_error(item: expert_pb2.CombineChunk) -> BaseException:
    where = f"combine chunk (micro_batch {item.micro_batch}, layer {item.layer}, rows from {item.row_offset})"
    return error_from_wire(item.error, f"{where} failed on the expert rank")


def _resolve(
    future: asyncio.Future[ExchangeResult], result: ExchangeResult | None, error: BaseException | None
) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call when it already is (what the split makes: per dispatch,
    a torch call costs more than the rest of the hand-off)."""
    return tensor if tensor.dtype is dtype else tensor.to(dtype)


class DirectExpertTransport(PerRankPlanes):
    """An attention rank's ``ExpertTransport`` to in-process expert ranks over ``DirectPlane`` links:
    per expert rank one ``ExchangeSession`` of its ``ExpertExchange`` (as one stream would have)."""

    counts_routes = True
    """The attention rank's split counts each dispatch's ids per expert once for all ranks
    (``split_by_rank(count=True)``), and the expert ranks take those counts instead of counting the
    same ids again (``chunks.Dispatch.counted``): the same counts, so the same modelled times."""

    def __init__(
        self,
        exchanges: Sequence[ExpertExchange],
        *,
        attention_rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_chunk_bytes: int,
        link_s: Callable[[int], float],
    ) -> None:
        links = in_process_links(
            len(exchanges),
            attention_rank=attention_rank,
            hidden_size=hidden_size,
            dtype=dtype,
            max_chunk_bytes=max_chunk_bytes,
            link_s=link_s,
        )
        self.planes: list[DirectPlane] = [
            DirectPlane(link, exchange.session(answer=_answer))
            for link, exchange in zip(links, exchanges, strict=True)
        ]

    async def close(self) -> None:
        await close_each(self.planes)
