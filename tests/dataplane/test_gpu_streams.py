"""The GPU fast plane's wait streams (``asap.dataplane.gpu_streams``) without a GPU: the budget, the
probe's verdicts, reuse after a drained give-back, a stream that never drains is never reused, and the
hardware-queue setting of rank processes."""

from __future__ import annotations

from typing import Any

from asap.dataplane import gpu_streams
from asap.dataplane.gpu_streams import (
    CONNECTIONS_ENV,
    RANK_CONNECTIONS,
    WaitStreams,
    configure_cuda_connections,
    connections,
    wait_budget,
)


class _Stream:
    def __init__(self, n: int) -> None:
        self.n, self.cuda_stream, self.busy = n, 1000 + n, False

    def query(self) -> bool:
        return not self.busy


def _pool(budget: int, shares: set[int] | None = None) -> tuple[WaitStreams, list[tuple[int, list[int]]]]:
    made: list[_Stream] = []
    probes: list[tuple[int, list[int]]] = []

    def make() -> _Stream:
        made.append(_Stream(len(made)))
        return made[-1]

    def probe(candidate: Any, others: list[Any]) -> bool:
        probes.append((candidate.n, [o.n for o in others]))
        return candidate.n in (shares or set())

    return WaitStreams(None, budget=budget, make=make, probe=probe), probes  # type: ignore[arg-type]


def test_wait_streams_are_probed_against_critical_and_taken_streams_and_bounded() -> None:
    pool, probes = _pool(budget=2)
    tx = pool.plain()
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None and a is not b
    assert pool.take() is None  # budget spent: the caller takes the path with no long wait
    assert probes == [(0, []), (1, [0]), (2, [0, 1])]  # each candidate against all handed out
    assert pool.critical == [tx]


def test_a_candidate_sharing_a_queue_is_put_aside() -> None:
    pool, _ = _pool(budget=4, shares={1, 2, 3})
    pool.plain()
    assert pool.take() is None  # three candidates share a queue: no wait stream, none handed out
    assert pool.rejected == 3
    stream = pool.take()
    assert stream is not None and stream.n == 4  # type: ignore[attr-defined]


def test_give_back_reuses_drained_streams_and_leaks_the_rest(monkeypatch: Any) -> None:
    monkeypatch.setattr(gpu_streams, "_DRAIN_S", 0.01)
    pool, _ = _pool(budget=2)
    tx = pool.plain()
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None
    pool.give_back(a)
    assert pool.take() is a  # drained: the next link reuses it, the budget holds
    b.busy = True  # type: ignore[attr-defined]
    pool.give_back(b)  # never drains: leaked, not reused
    assert pool.leaked == 1
    fresh = pool.take()
    assert fresh is not None and fresh is not b
    pool.give_back(tx)
    assert pool.critical == [] and pool.plain() is tx


def test_rank_processes_ask_for_32_hardware_queues_unless_chosen() -> None:
    env: dict[str, str] = {}
    configure_cuda_connections(env)
    assert env == {CONNECTIONS_ENV: str(RANK_CONNECTIONS)}
    assert connections(env) == 32 and wait_budget(env) == 16
    chosen = {CONNECTIONS_ENV: "4"}
    configure_cuda_connections(chosen)
    assert chosen[CONNECTIONS_ENV] == "4" and wait_budget(chosen) == 2
    assert connections({}) == 8 and connections({CONNECTIONS_ENV: "x"}) == 8
