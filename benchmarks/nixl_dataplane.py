"""Per-layer dispatch + combine between processes: the NIXL data plane against gRPC bytes, and the NIXL
path's bytes/s against a bare NIXL/UCX ping-pong of the same bytes, in one run.

The expert rank is the real ``expert_svc`` in its own process (``--data-plane auto``: it accepts NIXL
links when NIXL is installed) with a model whose experts are almost free to compute (hidden 2048, 8
experts of intermediate width 16, one layer, top-8), as in ``benchmarks/gpu_dataplane.py``, and every
row's expert slots say -1 (another rank's), so it computes next to nothing (its cost is measured and
reported beside, and taken out in ``nixl_share_of_bare_ucx_without_compute``). This process
is the attention side (the real ``GrpcExpertTransport``): one layer's dispatch of N rows and its combined
result, timed per plane. The reference is UCX's own speed on the same host and transports: two bare NIXL
agents (this process and a child) WRITE the same N rows to each other, one WRITE plus notification each
way per round trip, with nothing of ASAP around them. The UCX transport is UCX's choice unless
``UCX_TLS`` says otherwise (``UCX_TLS=tcp`` is what two hosts without RDMA would use); the expert child
inherits it.

    python3 benchmarks/nixl_dataplane.py --json /tmp/nixl_dataplane.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_dataplane as common
import torch

from asap.dataplane.nixl_link import load_nixl
from asap.dataplane.ring import Backoff
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import RankDispatch
from asap.model.tiny import make_tiny
from attention_svc.transport import GrpcExpertTransport
from tests.procs import ServiceProcess

_WARMUP = 3


async def _time_plane(
    target: str, plane: str, tokens: list[int], iters: int, device: str
) -> dict[str, dict[str, float]]:
    itemsize = common.DTYPE.itemsize
    slot = max(tokens) * (common.HIDDEN * itemsize + 2 * common.TOP_K * 4) + (2 << 20)
    transport = GrpcExpertTransport(
        [target],
        attention_rank=0,
        hidden_size=common.HIDDEN,
        dtype=common.DTYPE,
        max_chunk_bytes=2 * 1024 * 1024,
        data_plane=plane,
        device=device,
        region_bytes=4 * slot,  # every dispatch in a slot (the default slot is for 8k float32 rows)
    )
    try:
        await transport.infos(60)
        link = transport.links[0]
        assert link.data_plane == plane, (link.data_plane, plane)
        out: dict[str, dict[str, float]] = {}
        mb = 0
        for n in tokens:
            dispatch = _dispatch(n, device)
            times = []
            for i in range(iters + _WARMUP):
                mb += 1
                start = time.perf_counter()
                result = await transport.exchange(0, mb, 0, dispatch)
                elapsed = time.perf_counter() - start
                if i >= _WARMUP:
                    times.append(elapsed)
            assert result.hidden.shape == (n, common.HIDDEN)
            payload = 2 * n * common.HIDDEN * itemsize  # rows out and results back
            ms = statistics.median(times) * 1e3
            out[str(n)] = {
                "ms": ms,
                "p10_ms": sorted(times)[len(times) // 10] * 1e3,
                "GB_s": payload / ms / 1e6,
            }
            print(
                f"  {plane:5s} {n:6d} tokens: {ms:8.3f} ms median, {payload / ms / 1e6:6.2f} GB/s", flush=True
            )
        if plane == "nixl":
            carried = getattr(link.plane, "nixl_exchanges", 0)
            assert carried >= len(tokens) * (iters + _WARMUP), carried  # all of them through NIXL
        return out
    finally:
        await transport.close()


def _dispatch(n: int, device: str) -> RankDispatch:
    """N rows whose every expert slot is -1 (another rank's): the expert rank computes next to nothing
    and answers [N, H] zeros, so the round trip is the data path (on CPU the real expert math of these
    rows takes longer than the transfer and varies by ±50% between runs)."""
    d = common._dispatch(n, device)
    d.expert_ids.fill_(-1)
    return d


def _compute_ms(model: Path, tokens: list[int], device: str) -> dict[str, float]:
    """What the expert rank's computation of the same call costs (one torch thread, as the rank)."""
    config = load_config(model)
    with CheckpointReader(model) as reader:
        part = ExpertPart.from_source(
            reader, config, range(common.EXPERTS), dtype=common.DTYPE, device=device
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for n in tokens:
            d = _dispatch(n, device)
            part.compute(0, d.hidden, d.expert_ids, d.weights)
            common._sync(device)
            start = time.perf_counter()
            for _ in range(5):
                part.compute(0, d.hidden, d.expert_ids, d.weights)
            common._sync(device)
            out[str(n)] = (time.perf_counter() - start) / 5 * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def _agent(name: str, nbytes: int, folder: str) -> tuple[object, torch.Tensor, str]:
    """A bare NIXL agent with ``nbytes`` of registered host memory; its metadata and address go to
    ``folder`` for the other process."""
    nixl = load_nixl()
    agent = nixl.nixl_agent(name, nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
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


def _wait_note(agent: object, peer: str) -> None:
    backoff = Backoff(first_sleep_s=20e-6, park_s=1e-3)  # the planes' poll threads' discipline: spinning
    while not agent.get_new_notifs().get(peer):  # type: ignore[attr-defined]  # on 2 loaded cores starves
        backoff.idle([], [])  # the peer


def _pong(folder: str, nbytes: int, rounds: int) -> None:
    """The child of the bare ping-pong: answer every WRITE with a WRITE of the same size."""
    agent, buf, address = _agent("pong", nbytes, folder)
    answered = 0
    deadline = time.monotonic() + 600
    backoff = Backoff(first_sleep_s=20e-6, park_s=1e-3)
    while answered < rounds and time.monotonic() < deadline:
        notes = agent.get_new_notifs().get("ping", [])  # type: ignore[attr-defined]
        for note in notes:
            _write(agent, buf, int(address), int(note.decode()), "ping", b"pong")
            answered += 1
        if notes:
            backoff.reset()
        else:
            backoff.idle([], [])


def _bare_ucx(tokens: list[int], iters: int) -> dict[str, dict[str, float]]:
    itemsize = common.DTYPE.itemsize
    sizes = [n * common.HIDDEN * itemsize for n in tokens]
    rounds = len(tokens) * (iters + _WARMUP)
    with tempfile.TemporaryDirectory() as folder:
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--pong",
                folder,
                "--pong-bytes",
                str(max(sizes)),
                "--pong-rounds",
                str(rounds),
            ]
        )
        try:
            agent, buf, address = _agent("ping", max(sizes), folder)
            out = {}
            for n, size in zip(tokens, sizes, strict=True):
                times = []
                for i in range(iters + _WARMUP):
                    start = time.perf_counter()
                    _write(agent, buf, int(address), size, "pong", str(size).encode())
                    _wait_note(agent, "pong")
                    if i >= _WARMUP:
                        times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                out[str(n)] = {"ms": ms, "GB_s": 2 * size / ms / 1e6}
                print(
                    f"  bare UCX {n:6d} tokens: {ms:8.3f} ms median, {2 * size / ms / 1e6:6.2f} GB/s",
                    flush=True,
                )
            return out
        finally:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


async def run(args: argparse.Namespace) -> dict[str, object]:
    tokens = [int(t) for t in args.tokens.split(",")]
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    common.DTYPE = getattr(torch, args.dtype)
    device = args.device
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(
            Path(tmp) / "m", layers=1, hidden=common.HIDDEN, experts=common.EXPERTS, top_k=common.TOP_K,
            expert_intermediate=16, heads=16,
        )  # fmt: skip
        results: dict[str, object] = {
            "device": device,
            "torch": torch.__version__,
            "hidden": common.HIDDEN,
            "dtype": args.dtype,
            "top_k": common.TOP_K,
            "iters": args.iters,
            "UCX_TLS": os.environ.get("UCX_TLS", "(UCX's choice)"),
            "expert_compute_ms": _compute_ms(model, tokens, device),
        }
        proc = ServiceProcess(
            "expert",
            [
                "-m",
                "expert_svc",
                "--model",
                str(model),
                "--port",
                "0",
                "--device",
                device,
                "--dtype",
                args.dtype,
            ],
        )
        try:
            target = proc.wait_ready()
            planes = {
                plane: await _time_plane(target, plane, tokens, args.iters, device)
                for plane in ("grpc", "nixl")
            }
        finally:
            proc.stop()
        results["planes"] = planes
        results["bare_ucx"] = bare = _bare_ucx(tokens, args.iters)
        results["grpc_over_nixl"] = {
            n: planes["grpc"][n]["ms"] / planes["nixl"][n]["ms"] for n in planes["grpc"]
        }
        results["nixl_share_of_bare_ucx_GB_s"] = {
            n: planes["nixl"][n]["GB_s"] / bare[n]["GB_s"] for n in bare
        }
        compute = results["expert_compute_ms"]
        assert isinstance(compute, dict)
        results["nixl_share_of_bare_ucx_without_compute"] = {
            n: bare[n]["ms"] / max(planes["nixl"][n]["ms"] - compute[n], 1e-3) for n in bare
        }
        print(f"  grpc / nixl time: {results['grpc_over_nixl']}", flush=True)
        print(f"  nixl plane / bare UCX bytes/s: {results['nixl_share_of_bare_ucx_GB_s']}", flush=True)
        print(f"  the same, expert compute taken out: {results['nixl_share_of_bare_ucx_without_compute']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1024,8192")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="default: float32 on CPU (CPU bf16 matmuls take seconds and would hide the data path), bf16 on GPU",
    )
    parser.add_argument("--device", default="cpu", help="both ranks' device (cpu, or cuda:0 for the GPU run)")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--pong", help=argparse.SUPPRESS)
    parser.add_argument("--pong-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pong-rounds", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pong:
        _pong(args.pong, args.pong_bytes, args.pong_rounds)
        return
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
