"""``SyncAsapClient``: the blocking face of ``AsapClient``, for scripts and the ``asap`` command."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack, overload

from asap.client._types import ClientState, ClusterState, PrefillOptions, PrefillRequestSpec, PrefillResult
from asap.errors import AsapError

if TYPE_CHECKING:  # annotations only: the async client makes this one (``AsapClient.connect_sync``)
    from asap.client._client import AsapClient

T = TypeVar("T")


class SyncAsapClient:
    """A blocking client: an ``AsapClient`` living on a private event loop in a daemon thread.

    Same arguments, methods and errors as ``AsapClient`` (without ``await``); close it with ``close()``
    or use it as a context manager. Safe to call from several threads; calls run concurrently on the loop.
    Made by ``AsapClient.connect_sync(target)``, around a new, unopened ``AsapClient``.
    """

    def __init__(self, client: AsapClient) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asap-client-loop", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False
        try:
            # The grpc channel binds to the loop it is created on, so the client is opened there.
            self._client = self._run(self._open(client))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _open(client: AsapClient) -> AsapClient:
        return await client.__aenter__()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt and friends land here while the call is still running: cancel it.
            future.cancel()
            raise

    def _client_or_raise(self) -> AsapClient:
        if self._closed:
            raise RuntimeError("this SyncAsapClient is closed; create a new client")
        return self._client

    @property
    def target(self) -> str:
        return self._client.target

    @property
    def state(self) -> ClientState:
        return ClientState.CLOSED if self._closed else self._client.state

    def prefill(
        self,
        *,
        tokens: Sequence[int] | None = None,
        **options: Unpack[PrefillOptions],
    ) -> PrefillResult:
        """Blocking ``AsapClient.prefill``."""
        client = self._client_or_raise()
        return self._run(client.prefill(tokens=tokens, **options))

    @overload
    def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: Literal[False] = False,
    ) -> list[PrefillResult]: ...

    @overload
    def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: Literal[True],
    ) -> list[PrefillResult | AsapError]: ...

    def prefill_many(
        self,
        requests: Iterable[PrefillRequestSpec | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> list[PrefillResult] | list[PrefillResult | AsapError]:
        """Blocking ``AsapClient.prefill_many`` (one stream, results in input order)."""
        client = self._client_or_raise()
        items = list(requests)  # materialise here: the loop thread must not iterate caller objects
        if return_exceptions:
            return self._run(client.prefill_many(items, timeout_s=timeout_s, return_exceptions=True))
        return self._run(client.prefill_many(items, timeout_s=timeout_s))

    def cluster_state(self, *, timeout_s: float | None = None) -> ClusterState:
        """Blocking ``AsapClient.cluster_state``."""
        return self._run(self._client_or_raise().cluster_state(timeout_s=timeout_s))

    def close(self) -> None:
        """Close the client and stop its loop thread. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._run(self._client.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._loop.shutdown_asyncgens(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncAsapClient:
        self._client_or_raise()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
