"""An expert rank's answers to dispatch chunks, made without a task each (``expert_svc.exchange``).

``Reply``: an async chunk's answer (expert-overlap on, computed by the queue) made by loop callbacks,
used where the session's answer sink never waits (``never_waits``). ``run_now`` runs a coroutine that
does not wait to its end in the current step; ``error_reply`` is the combine chunk of a failed chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from asap.errors import AsapError, InternalError
from asap.v1 import expert_pb2
from asap.wire import chunks
from expert_svc.core import ExpertResult
from expert_svc.tracing import ChunkTrace

if TYPE_CHECKING:
    from expert_svc.exchange import Answers, ExchangeSession

__all__ = ["Reply", "error_reply", "never_waits", "run_now"]


def error_reply(
    micro_batch: int, layer: int, row_offset: int, total_rows: int, exc: AsapError
) -> expert_pb2.CombineChunk:
    """The combine chunk answering one dispatch chunk with ``exc``."""
    return chunks.error_combine(micro_batch, layer, row_offset, total_rows, exc.code, exc.message)


def never_waits(outbound: Answers) -> bool:
    """Whether ``outbound.put`` always returns without waiting (an unbounded queue; a sink that says so)."""
    if isinstance(outbound, asyncio.Queue):
        return outbound.maxsize <= 0
    return bool(getattr(outbound, "put_never_waits", False))


class Reply:
    """An async chunk's answer (expert-overlap on, computed by the queue), made by loop callbacks: what
    ``ExchangeSession._reply`` does for it — wait for the result, encode it on the codec thread, charge
    the emulated result transfer, put the answer — in the loop iterations and order in which its task
    takes those steps, without the task. ``done`` stands for the task in the session's ``_replies``: it
    ends when the answer is put (or the reply failed), and cancelling it (``abandon``) cancels the
    computation, as cancelling the task would."""

    __slots__ = ("dispatch", "done", "loop", "outbound", "session", "timer", "trace", "work")

    def __init__(
        self,
        session: ExchangeSession,
        dispatch: chunks.Dispatch,
        work: asyncio.Future[ExpertResult],
        trace: ChunkTrace | None,
        outbound: Answers,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.session = session
        self.dispatch = dispatch
        self.work = work
        self.trace = trace
        self.outbound = outbound
        self.loop = loop
        self.timer: asyncio.Handle | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    def start(self) -> None:
        """The task's first step: wait for the result (or go on now, if it is in)."""
        if self.done.done():
            return
        if self.work.done():
            self.computed(self.work)
        else:
            self.work.add_done_callback(self.computed)

    def computed(self, work: asyncio.Future[ExpertResult]) -> None:
        if self.done.done():
            return
        session = self.session
        try:
            result = work.result()
            if self.trace is not None:
                self.trace.computed(result)
            encoded = self.loop.run_in_executor(
                session.shared.codec, session.answer, self.dispatch, result, 0
            )
        except AsapError as exc:
            self.charge(self.error(exc))
            return
        except BaseException as exc:
            self.fail(exc)
            return
        if encoded.done():  # an inline codec: the task's ``await`` goes on in this step
            self.encoded(encoded)
        else:
            encoded.add_done_callback(self.encoded)

    def encoded(self, encoded: asyncio.Future[Any]) -> None:
        if self.done.done():
            return
        try:
            msg = encoded.result()
        except AsapError as exc:
            msg = self.error(exc)
        except BaseException as exc:
            self.fail(exc)
            return
        self.charge(msg)

    def error(self, exc: AsapError) -> expert_pb2.CombineChunk:
        self.trace = None
        d = self.dispatch
        return error_reply(d.micro_batch, d.layer, d.row_offset, d.total_rows, exc)

    def charge(self, msg: Any) -> None:
        """Emulated compute: the result's link time (``charge``: a timer, then the step after it)."""
        shared = self.session.shared
        if shared.profile is None or not self.dispatch.rows:
            self.send(msg)
            return
        try:
            seconds = shared.transfer_s(self.dispatch.rows, self.dispatch.attention_rank)
        except BaseException as exc:
            self.fail(exc)
            return
        loop = self.loop
        if seconds > 0:
            self.timer = loop.call_at(loop.time() + seconds, loop.call_soon, self.send, msg)
        else:  # ``asyncio.sleep(0)``: one iteration
            loop.call_soon(self.send, msg)

    def send(self, msg: Any) -> None:
        # The timer has fired (cancelling it now would do nothing); it holds this bound method in its
        # arguments, so keeping it would make every charged reply a reference cycle, left for the
        # cyclic garbage collector (~1.7M objects in a 10 s window of the simulator's issue run).
        self.timer = None
        if self.done.done():
            return
        try:
            if isinstance(self.outbound, asyncio.Queue):
                self.outbound.put_nowait(msg)
            else:
                run_now(self.outbound.put(msg))
        except BaseException as exc:
            self.fail(exc)
            return
        if self.trace is not None:
            self.trace.sent()
        self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """What the task would end with: cancelled, or failed with ``exc`` (``finish`` raises it)."""
        if self.done.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.done.cancel()
        else:
            self.done.set_exception(exc)

    def finished(self, done: asyncio.Future[None]) -> None:
        """``done``'s callback: out of the session's answers; cancelled, its computation and timer too."""
        self.session._replies.discard(done)
        if done.cancelled():
            if not self.work.done():
                self.work.cancel()
            if self.timer is not None:
                self.timer.cancel()


def run_now(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end now, in this step: a coroutine that does not wait (a ``put`` that never
    waits, ``never_waits``; the direct plane's ``accept``). ``InternalError`` if it waited after all."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise InternalError(f"{coro!r} waited where it must run to its end at once")
