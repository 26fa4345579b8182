"""Per-layer dispatch + combine between processes: the NIXL data plane against gRPC bytes, and the NIXL
path's bytes/s against a bare NIXL/UCX ping-pong of the same bytes, in one run; with ``--base REV`` the
same measurement of the code at git revision REV in the same run (A/B, alternating).

The expert rank is the real ``expert_svc`` in its own process (``--data-plane auto``: it accepts NIXL
links when NIXL is installed) with a model whose experts are almost free to compute (hidden 2048, 8
experts of intermediate width 16, one layer, top-8), as in ``benchmarks/gpu_dataplane.py``, and every
row's expert slots say -1 (another rank's), so it computes next to nothing. The attention side is the real
``GrpcExpertTransport`` in a child process of this one: one layer's dispatch of N rows and its combined
result (fresh tensors every layer, as ``split_by_rank`` makes them), timed per path: ``grpc`` (bytes), ``nixl loop`` (``exchange`` on the event loop: sync modes and
other callers) and ``nixl hot`` (the async-mode path: the compute thread posts and polls,
``DirectLink``), the latter only where the code has it.

Like with like: the reference is UCX's own speed between two processes of this host with the same UCX
transports (``UCX_TLS`` as set; ``UCX_TLS=tcp`` is what two hosts without RDMA would use), two bare NIXL
agents configured as the plane's (no progress thread, strict thread sync) that WRITE exactly the bytes
the plane moves (out: slot header + rows + ids + weights; back: the result rows), one WRITE plus
notification each way, nothing of ASAP around them, polled with the planes' back-off ("bare UCX") and
spinning ("bare UCX spinning": a core per waiting process; on a loaded 2-core host the two spinners
starve each other and it is slower, measured). "Transfer" is a
plane's round trip minus the expert rank's own computation time of it (``compute_ns`` of its
completions, read from the same round trips), so the expert call is taken out as the rank measured it.

    python3 benchmarks/nixl_dataplane.py --base HEAD~1 --json /tmp/nixl_dataplane.json
    UCX_TLS=tcp python3 benchmarks/nixl_dataplane.py --json /tmp/nixl_dataplane_tcp.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = os.environ.get("ASAP_BENCH_ROOT") or str(_HERE.parent)  # the tree under test (a child's A or B)
sys.path[:0] = [_ROOT]  # (not benchmarks/gpu_dataplane: it puts its own tree first)

import torch

from asap.dataplane import fastlink
from asap.dataplane.nixl_link import load_nixl
from asap.dataplane.ring import Backoff
from asap.model.placement import RankDispatch

_WARMUP = 3


class common:
    HIDDEN, EXPERTS, TOP_K = 2048, 8, 8
    DTYPE = torch.bfloat16


_expert_compute_ns = [0]  # the expert's own compute_ns of the completions this process took
_last: list[fastlink.Completion | int] = [0, 0]  # the last completion unpacked and when (time.time_ns)


def _count_compute() -> None:
    """Read each completion's ``compute_ns`` as it is unpacked (the same code in A and B)."""
    unpack = fastlink.Completion.unpack.__func__  # type: ignore[attr-defined]

    def counted(cls: type, raw: bytes) -> fastlink.Completion:
        completion: fastlink.Completion = unpack(cls, raw)
        _expert_compute_ns[0] += completion.compute_ns
        _last[:] = [completion, time.time_ns()]
        return completion

    fastlink.Completion.unpack = classmethod(counted)  # type: ignore[method-assign, assignment]


def _dispatch(n: int) -> RankDispatch:
    """N rows whose every expert slot is -1 (another rank's): the expert rank computes next to nothing
    and answers [N, H] zeros, so the round trip is mostly the data path."""
    g = torch.Generator().manual_seed(n)
    return RankDispatch(
        rank=0,
        rows=torch.arange(n),
        hidden=torch.randn(n, common.HIDDEN, generator=g).to(common.DTYPE),
        expert_ids=torch.full((n, common.TOP_K), -1, dtype=torch.int32),
        weights=torch.full((n, common.TOP_K), 1.0 / common.TOP_K),
    )


def _fresh(d: RankDispatch) -> RankDispatch:
    """The same rows in newly allocated tensors (``split_by_rank`` gathers every layer's dispatch anew:
    a plane that reads the dispatch's memory must not be timed on memory it saw before)."""
    return RankDispatch(d.rank, d.rows, d.hidden.clone(), d.expert_ids.clone(), d.weights.clone())


def _legs(start_unix: int, end_unix: int) -> dict[str, float]:
    """Where a NIXL round trip went (ms; one host, one clock): until the expert took the request, its
    wait and computation, until its completion was unpacked here, and the rest until the caller had
    the results."""
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


def _hot_round_trip(link: object, request: object) -> None:
    """One dispatch on the hot path, waited for as the attention compute thread waits (poll, park)."""
    from asap.dataplane.direct import SHORT_PARK_S, Ticket, Wake

    wake = Wake()
    ticket = Ticket(wake)
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
    wake.close()
    if not hasattr(ticket.outcome, "hidden"):
        raise SystemExit(f"hot-path dispatch failed: {ticket.outcome}")


async def _time_paths(
    target: str, plane: str, tokens: list[int], iters: int
) -> dict[str, dict[str, dict[str, float]]]:
    from asap.dataplane.plane import PlaneRequest
    from attention_svc.transport import GrpcExpertTransport

    itemsize = common.DTYPE.itemsize
    slot = max(tokens) * (common.HIDDEN * itemsize + 2 * common.TOP_K * 4) + (2 << 20)
    transport = GrpcExpertTransport(
        [target], attention_rank=0, hidden_size=common.HIDDEN, dtype=common.DTYPE,
        max_chunk_bytes=2 * 1024 * 1024, data_plane=plane, device="cpu",
        region_bytes=4 * slot,  # every dispatch in a slot (the default slot is for 8k float32 rows)
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    paths: dict[str, dict[str, dict[str, float]]] = {}
    mb = 0
    try:
        await transport.infos(60)
        link = transport.links[0]
        assert link.data_plane == plane, (link.data_plane, plane)
        for path in ("loop", "hot") if plane == "nixl" else ("loop",):
            out: dict[str, dict[str, float]] = {}
            for n in tokens:
                rows = _dispatch(n)
                times, computed, legs = [], [], []
                for i in range(iters + _WARMUP):
                    mb += 1
                    dispatch = _fresh(rows)  # (untimed) fresh tensors every layer, as split_by_rank makes
                    before = _expert_compute_ns[0]
                    start_unix = time.time_ns()
                    start = time.perf_counter()
                    if path == "loop":
                        result = await transport.exchange(0, mb, 0, dispatch)
                        assert result.hidden.shape == (n, common.HIDDEN)
                    else:
                        direct = transport.direct_links(common.TOP_K)
                        if direct is None:  # this code has no hot path for NIXL
                            break
                        request = PlaneRequest(mb, 0, dispatch)
                        await loop.run_in_executor(None, _hot_round_trip, direct[0], request)
                    if i >= _WARMUP:
                        times.append(time.perf_counter() - start)
                        computed.append((_expert_compute_ns[0] - before) / 1e9)
                        legs.append(_legs(start_unix, time.time_ns()))
                if not times:
                    break
                ms = statistics.median(times) * 1e3
                payload = 2 * n * common.HIDDEN * itemsize  # rows out and results back
                out[str(n)] = {
                    "ms": ms,
                    "p10_ms": sorted(times)[len(times) // 10] * 1e3,
                    "GB_s": payload / ms / 1e6,
                    "expert_compute_ms": statistics.median(computed) * 1e3,
                    **({k: statistics.median(leg[k] for leg in legs) for k in legs[0]} if legs[0] else {}),
                    "transfer_ms": statistics.median(t - c for t, c in zip(times, computed, strict=True))
                    * 1e3,
                }
                print(f"    {plane} {path:4s} {n:6d} tokens: {ms:8.3f} ms", file=sys.stderr, flush=True)
            if out:
                paths[path] = out
        if plane == "nixl":
            assert getattr(link.plane, "nixl_exchanges", 0) >= len(tokens) * (iters + _WARMUP)
        return paths
    finally:
        await transport.close()


async def _child(args: argparse.Namespace, tokens: list[int]) -> dict[str, object]:
    """One tree's measurement (this process runs that tree's code; so does its expert process)."""
    from asap.model.tiny import make_tiny
    from tests.procs import ServiceProcess

    _count_compute()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(
            Path(tmp) / "m", layers=1, hidden=common.HIDDEN, experts=common.EXPERTS, top_k=common.TOP_K,
            expert_intermediate=16, heads=16,
        )  # fmt: skip
        argv = ["-m", "expert_svc", "--model", str(model), "--port", "0", "--dtype", args.dtype]
        proc = ServiceProcess("expert", argv)
        try:
            target = proc.wait_ready()
            results: dict[str, object] = {}
            for plane in ("grpc", "nixl"):
                for path, figures in (await _time_paths(target, plane, tokens, args.iters)).items():
                    results[f"{plane} {path}" if plane == "nixl" else plane] = figures
            import asap.dataplane.nixl_plane as tree

            results["code"] = tree.__file__  # which tree this child ran
            return results
        finally:
            proc.stop()


def _agent(name: str, nbytes: int, folder: str) -> tuple[object, torch.Tensor, str]:
    """A bare NIXL agent configured as the plane's, with ``nbytes`` of registered host memory; its
    metadata and address go to ``folder`` for the other process."""
    nixl = load_nixl()
    config = nixl.nixl_agent_config(
        enable_prog_thread=False, backends=["UCX"], sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
    )
    agent = nixl.nixl_agent(name, config)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    agent.register_memory([(buf.data_ptr(), nbytes, 0, "")], "DRAM")
    tmp = os.path.join(folder, f"{name}.tmp")
    Path(tmp).write_bytes(agent.get_agent_metadata() + b"@@" + str(buf.data_ptr()).encode())
    os.replace(tmp, os.path.join(folder, f"{name}.md"))
    peer = "pong" if name == "ping" else "ping"
    path = os.path.join(folder, f"{peer}.md")
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {peer} agent")
        time.sleep(0.01)
    metadata, _, address = Path(path).read_bytes().rpartition(b"@@")
    agent.add_remote_agent(metadata)  # type: ignore[attr-defined]
    return agent, buf, address.decode()


def _write(agent: object, buf: torch.Tensor, address: int, n: int, peer: str, note: bytes) -> None:
    a: object = agent
    local = a.get_xfer_descs([(buf.data_ptr(), n, 0)], "DRAM")  # type: ignore[attr-defined]
    remote = a.get_xfer_descs([(address, n, 0)], "DRAM")  # type: ignore[attr-defined]
    handle = a.initialize_xfer("WRITE", local, remote, peer, note)  # type: ignore[attr-defined]
    state = a.transfer(handle)  # type: ignore[attr-defined]
    while state == "PROC":
        state = a.check_xfer_state(handle)  # type: ignore[attr-defined]
    if state != "DONE":
        raise SystemExit(f"WRITE failed: {state}")
    handle.release()


def _wait_note(agent: object, peer: str, spin: bool) -> bytes:
    """The peer's next notification: polled with the planes' poll threads' back-off, or spinning (a core
    per waiting process)."""
    backoff = Backoff(first_sleep_s=20e-6, park_s=1e-3)
    while True:
        got = agent.get_new_notifs().get(peer)  # type: ignore[attr-defined]
        if got:
            return bytes(got[0])
        if not spin:
            backoff.idle([], [])


def _pong(folder: str, nbytes: int, rounds: int, spin: bool) -> None:
    """The child of the bare ping-pong: answer every WRITE with a WRITE of the size it names."""
    agent, buf, address = _agent("pong", nbytes, folder)
    for _ in range(rounds):
        _write(agent, buf, int(address), int(_wait_note(agent, "ping", spin).decode()), "ping", b"pong")


def _sizes(n: int) -> tuple[int, int]:
    """(bytes out, bytes back) of one NIXL dispatch of ``n`` rows: what the plane WRITEs each way."""
    rows = n * common.HIDDEN * common.DTYPE.itemsize
    return fastlink.SLOT_HEADER_BYTES + rows + n * common.TOP_K * 8, rows


def _bare_ucx(tokens: list[int], iters: int, spin: bool) -> dict[str, dict[str, float]]:
    biggest = max(sum(_sizes(n)) for n in tokens)
    rounds = len(tokens) * (iters + _WARMUP)
    with tempfile.TemporaryDirectory() as folder:
        argv = [__file__, "--pong", folder, "--pong-bytes", str(biggest), "--pong-rounds", str(rounds)]
        argv += ["--pong-spin"] if spin else []
        child = subprocess.Popen([sys.executable, *argv])
        try:
            agent, buf, address = _agent("ping", biggest, folder)
            out = {}
            for n in tokens:
                size_out, size_back = _sizes(n)
                times = []
                for i in range(iters + _WARMUP):
                    start = time.perf_counter()
                    _write(agent, buf, int(address), size_out, "pong", str(size_back).encode())
                    _wait_note(agent, "pong", spin)
                    if i >= _WARMUP:
                        times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                out[str(n)] = {"ms": ms, "GB_s": 2 * n * common.HIDDEN * common.DTYPE.itemsize / ms / 1e6}
                print(
                    f"    bare UCX{' spin' if spin else ''} {n:6d} tokens: {ms:8.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            return out
        finally:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def _tree(rev: str, into: str) -> str:
    """The repository at ``rev``, unpacked into ``into`` (the A side of an A/B)."""
    archive = subprocess.run(
        ["git", "-C", str(_HERE.parent), "archive", rev], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def _measure(root: str, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, ASAP_BENCH_ROOT=root, PYTHONPATH=root)
        argv = [
            "--child",
            out.name,
            "--tokens",
            args.tokens,
            "--iters",
            str(args.iters),
            "--dtype",
            args.dtype,
        ]
        subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        result: dict[str, object] = json.loads(Path(out.name).read_text())
        return result


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip() if os.path.exists("/proc/loadavg") else "?"


def run(args: argparse.Namespace, tokens: list[int]) -> dict[str, object]:
    results: dict[str, object] = {
        "hidden": common.HIDDEN, "dtype": args.dtype, "top_k": common.TOP_K, "iters": args.iters,
        "UCX_TLS": os.environ.get("UCX_TLS", "(UCX's choice)"), "load_before": _load(), "base": args.base,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"head": str(_HERE.parent)}
        if args.base:
            trees = {"base": _tree(args.base, tmp), **trees}
        rounds: list[dict[str, object]] = []
        for r in range(args.rounds):
            print(f"  round {r + 1}: bare UCX", file=sys.stderr, flush=True)
            one: dict[str, object] = {
                "bare UCX": _bare_ucx(tokens, args.iters, spin=False),
                "bare UCX spinning": _bare_ucx(tokens, args.iters, spin=True),
            }
            for name, root in trees.items():
                print(f"  round {r + 1}: {name}", file=sys.stderr, flush=True)
                one[name] = _measure(root, args)
            rounds.append(one)
    results["rounds"] = rounds
    results["load_after"] = _load()
    results["summary"] = _summary(rounds, tokens)
    return results


def _summary(rounds: list[dict[str, object]], tokens: list[int]) -> list[str]:
    """One line per (tree, path, tokens): round trip, transfer, share of bare UCX, gRPC / it."""
    lines = []
    for r, one in enumerate(rounds):
        bare: dict[str, dict[str, float]] = one["bare UCX"]  # type: ignore[assignment]
        spin: dict[str, dict[str, float]] = one["bare UCX spinning"]  # type: ignore[assignment]
        for tree, paths in one.items():
            if tree.startswith("bare UCX"):
                continue
            assert isinstance(paths, dict)
            for path, figures in paths.items():
                if path == "code":
                    continue
                for n in tokens:
                    f, b, sb = figures[str(n)], bare[str(n)], spin[str(n)]
                    grpc = paths["grpc"][str(n)]["ms"]
                    lines.append(
                        f"round {r + 1} {tree:4s} {path:9s} {n:5d}: {f['ms']:8.2f} ms round trip "
                        f"({f['GB_s']:.2f} GB/s), grpc/this {grpc / f['ms']:5.2f}x, "
                        f"{b['ms'] / f['ms']:6.1%} of bare UCX ({b['ms']:.2f} ms); transfer (expert compute "
                        f"{f['expert_compute_ms']:.2f} ms out) {f['transfer_ms']:.2f} ms = "
                        f"{b['ms'] / f['transfer_ms']:6.1%} of bare UCX, "
                        f"{sb['ms'] / f['transfer_ms']:6.1%} of it spinning ({sb['ms']:.2f} ms)"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1024,8192")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--base", help="also measure the code at this git revision (A/B in one run)")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of bare UCX, base and head")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pong", help=argparse.SUPPRESS)
    parser.add_argument("--pong-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pong-rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pong-spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    common.DTYPE = getattr(torch, args.dtype)
    if args.pong:
        _pong(args.pong, args.pong_bytes, args.pong_rounds, args.pong_spin)
        return
    if args.child:
        Path(args.child).write_text(json.dumps(asyncio.run(_child(args, tokens))))
        return
    results = run(args, tokens)
    print(json.dumps(results, indent=1))
    print("\n".join(results["summary"]))  # type: ignore[arg-type]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
