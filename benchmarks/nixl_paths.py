"""The attention side of ``benchmarks/nixl_dataplane.py``, run in a child process with the tree under
test first on its import path: the real ``GrpcExpertTransport`` against a real ``expert_svc`` process,
one layer's dispatch of N rows and its combined result per round trip, timed per path (``grpc`` bytes,
``nixl loop``: ``exchange`` on the event loop, ``nixl hot``: the compute thread posts and polls). Every
NIXL round trip is paired with one round trip of the bare UCX reference (``benchmarks/nixl_bare.py``)
of the same bytes, in this process, right before or after it (the order alternates), so both see the
same load; a pair's *share* is bare's time over the path's (its bytes/s over bare's).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from asap.dataplane import fastlink
from asap.model.placement import RankDispatch

WARMUP = 3
LINK_WARMUP = 8
"""Untimed round trips on both NIXL paths, alternating, before any is timed: the first round trips after
the link is set up cost more on either path (round 4 in benchmarks/README.md); without them they fell
on whichever path is measured first."""


@dataclass(slots=True)
class Shape:
    """The benchmark's layer: hidden size, top-k, dtype, device."""

    hidden: int = 2048
    top_k: int = 8
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def sizes(self, n: int) -> tuple[int, int]:
        """(bytes out, bytes back) of one NIXL dispatch of ``n`` rows: what the plane WRITEs each way."""
        rows = n * self.hidden * self.dtype.itemsize
        return fastlink.SLOT_HEADER_BYTES + rows + n * self.top_k * 8, rows


_expert_compute_ns = [0]  # the expert's own compute_ns of the completions this process took
_last: list[fastlink.Completion | int] = [0, 0]  # the last completion unpacked and when (time.time_ns)


def count_compute() -> None:
    """Read each completion's ``compute_ns`` as it is unpacked (the same code in A and B)."""
    unpack = fastlink.Completion.unpack.__func__  # type: ignore[attr-defined]

    def counted(cls: type, raw: bytes) -> fastlink.Completion:
        completion: fastlink.Completion = unpack(cls, raw)
        _expert_compute_ns[0] += completion.compute_ns
        _last[:] = [completion, time.time_ns()]
        return completion

    fastlink.Completion.unpack = classmethod(counted)  # type: ignore[method-assign, assignment]


def dispatch(shape: Shape, n: int) -> RankDispatch:
    """N rows whose every expert slot is -1 (another rank's): the expert rank computes next to nothing
    and answers [N, H] zeros, so the round trip is mostly the data path."""
    g = torch.Generator().manual_seed(n)
    return RankDispatch(
        rank=0,
        rows=torch.arange(n),
        hidden=torch.randn(n, shape.hidden, generator=g).to(shape.dtype).to(shape.device),
        expert_ids=torch.full((n, shape.top_k), -1, dtype=torch.int32, device=shape.device),
        weights=torch.full((n, shape.top_k), 1.0 / shape.top_k, device=shape.device),
    )


def fresh(d: RankDispatch) -> RankDispatch:
    """The same rows in newly allocated tensors (``split_by_rank`` gathers every layer's dispatch anew:
    a plane that reads the dispatch's memory must not be timed on memory it saw before)."""
    return RankDispatch(d.rank, d.rows, d.hidden.clone(), d.expert_ids.clone(), d.weights.clone())


def _legs(start_unix: int, end_unix: int) -> dict[str, float]:
    """Where a NIXL round trip went (ms; one host, one clock): until the expert took the request, its
    wait, until its completion was unpacked here, and the rest until the caller had the results."""
    completion, arrived = _last
    if (
        not isinstance(completion, fastlink.Completion)
        or not isinstance(arrived, int)
        or arrived < start_unix
    ):
        return {}
    picked = completion.picked_unix_ns
    answered = picked + completion.queue_ns + completion.compute_ns
    return {
        "leg_out_ms": (picked - start_unix) / 1e6,
        "leg_expert_queue_ms": completion.queue_ns / 1e6,
        "leg_back_ms": (arrived - answered) / 1e6,
        "leg_after_ms": (end_unix - arrived) / 1e6,
    }


def _hot_round_trip(link: object, request: object) -> tuple[float, int, int]:
    """One dispatch on the hot path, waited for as the attention compute thread waits (poll, park);
    its seconds, start and end (``time.time_ns``), timed on this thread (as a compute thread that is already
    running posts it: the executor hop that brought the benchmark here is not the plane's)."""
    from asap.dataplane.direct import SHORT_PARK_S, Ticket, Wake

    wake = Wake()
    ticket = Ticket(wake)
    start_unix = time.time_ns()
    start = time.perf_counter()
    ticket.posted_ns = time.monotonic_ns()
    link.post(request, ticket)  # type: ignore[attr-defined]
    while not ticket.done:
        wake.clear()
        link.poll()  # type: ignore[attr-defined]
        if ticket.done:
            break
        fds = link.park(True)  # type: ignore[attr-defined]
        try:
            link.poll()  # type: ignore[attr-defined]
            if not ticket.done:
                wake.wait(SHORT_PARK_S if not fds else 1.0, fds)
        finally:
            link.park(False)  # type: ignore[attr-defined]
    took = time.perf_counter() - start
    end_unix = time.time_ns()
    wake.close()
    if not hasattr(ticket.outcome, "hidden"):
        raise SystemExit(f"hot-path dispatch failed: {ticket.outcome}")
    return took, start_unix, end_unix


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(
    shape: Shape,
    n: int,
    times: list[float],
    computed: list[float],
    bare: list[float],
    legs: list[dict[str, float]],
) -> dict[str, float]:
    """Medians and spread (p10, p90) of one path at ``n`` rows; with ``bare`` (the paired reference
    round trips), the per-pair shares of bare's bytes/s, of the round trip and of the transfer (the
    round trip less the expert rank's own compute time)."""
    ms = statistics.median(times) * 1e3
    transfer = [t - c for t, c in zip(times, computed, strict=True)]
    out = {
        "ms": ms,
        "p10_ms": _q(times, 0.1) * 1e3,
        "p90_ms": _q(times, 0.9) * 1e3,
        "GB_s": 2 * n * shape.hidden * shape.dtype.itemsize / ms / 1e6,  # rows out and results back
        "expert_compute_ms": statistics.median(computed) * 1e3,
        "transfer_ms": statistics.median(transfer) * 1e3,
    }
    if legs and legs[0]:
        out.update({k: statistics.median(leg[k] for leg in legs) for k in legs[0]})
    if bare:
        share = [b / t for b, t in zip(bare, times, strict=True)]
        moved = [b / max(t, 1e-9) for b, t in zip(bare, transfer, strict=True)]
        out.update(
            bare_ms=statistics.median(bare) * 1e3,
            bare_p10_ms=_q(bare, 0.1) * 1e3,
            bare_p90_ms=_q(bare, 0.9) * 1e3,
            share=statistics.median(share),
            share_p10=_q(share, 0.1),
            share_p90=_q(share, 0.9),
            transfer_share=statistics.median(moved),
            transfer_share_p10=_q(moved, 0.1),
            transfer_share_p90=_q(moved, 0.9),
        )
    return out


async def _warm_link(transport: object, shape: Shape, n: int, mb: int) -> int:
    """``LINK_WARMUP`` untimed round trips of ``n`` rows, loop and hot path alternating (the first one on
    the loop path connects the end); the last micro-batch number used."""
    from asap.dataplane.plane import PlaneRequest

    rows = dispatch(shape, n)
    loop = asyncio.get_running_loop()
    for i in range(LINK_WARMUP):
        mb += 1
        direct = transport.direct_links(shape.top_k) if i % 2 else None  # type: ignore[attr-defined]
        if direct is None:
            await transport.exchange(0, mb, 0, fresh(rows))  # type: ignore[attr-defined]
        else:
            await loop.run_in_executor(None, _hot_round_trip, direct[0], PlaneRequest(mb, 0, fresh(rows)))
    return mb


async def time_paths(
    target: str,
    plane: str,
    tokens: list[int],
    iters: int,
    shape: Shape,
    bare: object | None,
    hot_first: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per path of ``plane`` and per row count, the figures of ``iters`` round trips after ``WARMUP``;
    ``bare`` (a ``BarePair``) is paired with every NIXL round trip. NIXL's two paths are measured after
    ``LINK_WARMUP`` round trips of both, the hot one first with ``hot_first`` (the driver alternates)."""
    from asap.dataplane.plane import PlaneRequest
    from attention_svc.transport import GrpcExpertTransport

    slot = max(tokens) * (shape.hidden * shape.dtype.itemsize + 2 * shape.top_k * 4) + (2 << 20)
    transport = GrpcExpertTransport(
        [target], attention_rank=0, hidden_size=shape.hidden, dtype=shape.dtype,
        max_chunk_bytes=2 * 1024 * 1024, data_plane=plane, device=str(shape.device),
        region_bytes=4 * slot,  # every dispatch in a slot (the default slot is for 8k float32 rows)
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    paths: dict[str, dict[str, dict[str, float]]] = {}
    mb = 0
    try:
        await transport.infos(60)
        link = transport.links[0]
        assert link.data_plane == plane, (link.data_plane, plane)
        order = ("loop",)
        if plane == "nixl":
            mb = await _warm_link(transport, shape, max(tokens), mb)
            order = ("hot", "loop") if hot_first else ("loop", "hot")
        for path in order:
            out: dict[str, dict[str, float]] = {}
            for n in tokens:
                rows = dispatch(shape, n)
                times: list[float] = []
                computed: list[float] = []
                paired: list[float] = []
                legs: list[dict[str, float]] = []
                for i in range(iters + WARMUP):
                    mb += 1
                    d = fresh(rows)  # (untimed) fresh tensors every layer, as split_by_rank makes them
                    if shape.device.type == "cuda":
                        torch.cuda.synchronize(shape.device)
                    reference = 0.0
                    if bare is not None and i % 2 == 0:
                        reference = bare.round_trip(*shape.sizes(n))  # type: ignore[attr-defined]
                    before = _expert_compute_ns[0]
                    start_unix = time.time_ns()
                    start = time.perf_counter()
                    if path == "loop":
                        result = await transport.exchange(0, mb, 0, d)
                        if shape.device.type == "cuda":
                            torch.cuda.synchronize(shape.device)
                        assert result.hidden.shape == (n, shape.hidden)
                        took = time.perf_counter() - start
                        end_unix = time.time_ns()
                    else:
                        direct = transport.direct_links(shape.top_k)
                        if direct is None:  # this code has no hot path for NIXL
                            break
                        request = PlaneRequest(mb, 0, d)
                        took, start_unix, end_unix = await loop.run_in_executor(
                            None, _hot_round_trip, direct[0], request
                        )
                    if bare is not None and i % 2 == 1:
                        reference = bare.round_trip(*shape.sizes(n))  # type: ignore[attr-defined]
                    if i >= WARMUP:
                        times.append(took)
                        computed.append((_expert_compute_ns[0] - before) / 1e9)
                        legs.append(_legs(start_unix, end_unix))
                        if bare is not None:
                            paired.append(reference)
                if not times:
                    break
                out[str(n)] = figures(shape, n, times, computed, paired, legs)
                print(
                    f"    {plane} {path:4s} {n:6d} tokens: {out[str(n)]['ms']:8.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            if out:
                paths[path] = out
        if plane == "nixl":
            assert getattr(link.plane, "nixl_exchanges", 0) >= len(tokens) * (iters + WARMUP)
        return paths
    finally:
        await transport.close()
