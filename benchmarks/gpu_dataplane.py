"""Per-layer dispatch + combine on GPUs: the CUDA IPC data plane against gRPC bytes, in one run.

An expert service runs in its own process (the real ``expert_svc``, bf16 on a GPU) with a model whose
experts are almost free to compute (hidden 2048, 8 experts of intermediate width 16, one layer), so the
round trip is the data path: the attention side (this process, cuda:0, the real ``GrpcExpertTransport``)
sends one layer's dispatch of N token rows (hidden 2048 bf16, top-8 ids and weights) and waits for the
combined result on its GPU. Timed per plane, per N, with the expert rank on the same GPU and (with two
GPUs) on the other one. The expert compute time of the same call is measured in-process and reported
beside, so the data-path share is visible (host-timed through ``ExpertPart.compute``, and on GPUs also the
device time of the graph replay alone). On GPUs the planes are gRPC bytes, CUDA IPC referenced from gRPC
messages (``cuda-ipc``) and the descriptor rings with slots in CUDA IPC memory and stream flags
(``fast``); a ``fast`` round trip ends when its result's ready event has passed. ``--cpu`` runs the same comparison for CPU ranks: gRPC bytes,
POSIX shared memory referenced from gRPC messages (``shm``), and the descriptor rings with fixed slots
(``fast``, no gRPC per layer). ``--direct`` posts the fast plane's dispatches as the attention rank's
hot path does (``asap.dataplane.direct``: a compute thread posts, polls and parks on the completion
doorbell; GPU links offer it with ``ASAP_GPU_HOT_PATH=1``), instead of ``exchange`` on the event loop.
With ``ASAP_GPU_DEVICE_TIMING=1`` the hops also hold the device side, from timing events on the attention
rank's tx and rx streams: ``gpu_fill``, ``gpu_flag_to_done`` (request flag written -> the expert's done
flag seen: the expert's start latency plus its computation) and ``gpu_copy_out``.
``--host-ahead-us N`` (with ``--direct``) puts the host ahead of the device, as in serving, where a
layer's dispatch is posted right after the kernels that produce it are enqueued: after the host-timed
round trips of each size, as many again in which each post follows an N µs device sleep on the posting
stream, and the device-side round trip is reported beside the host-timed one, from the sleep's end (the rows "produced") until the results are usable on the posting
stream (``device_ms``), with the share of posts that returned before the sleep ended (``host_ahead``: a
share under 1 means the host, not the device, was on the path).

    python3 benchmarks/gpu_dataplane.py --json $OUT/gpu_dataplane.json
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asap.dataplane.direct import DirectLink, Wake
from asap.dataplane.gpu_streams import configure_cuda_connections
from asap.dataplane.plane import ExchangeResult
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import RankDispatch
from asap.model.tiny import make_tiny
from attention_svc.transport import GrpcExpertTransport
from benchmarks._direct_timing import AHEAD, DEVICE, PROFILE, VERDICTS, timed_direct
from tests.procs import ServiceProcess

HIDDEN, EXPERTS, TOP_K = 2048, 8, 8
DTYPE = torch.bfloat16
"""bf16 on GPUs; ``--cpu`` uses float32 (CPU bf16 matmuls take seconds here and would hide the data path)."""


def _dispatch(rows: int, device: str) -> RankDispatch:
    g = torch.Generator(device=device).manual_seed(rows)
    return RankDispatch(
        rank=0,
        rows=torch.arange(rows, device=device),
        hidden=torch.randn(rows, HIDDEN, device=device, generator=g).to(DTYPE),
        expert_ids=torch.arange(TOP_K, device=device, dtype=torch.int32).repeat(rows, 1),
        weights=torch.full((rows, TOP_K), 1.0 / TOP_K, device=device),
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


async def _time_plane(
    target: str,
    plane: str,
    tokens: list[int],
    iters: int,
    device: str,
    direct: bool = False,
    refs: dict[int, torch.Tensor] | None = None,
    gate_us: float = 0.0,
) -> dict[str, dict[str, float]]:
    transport = GrpcExpertTransport(
        [target],
        attention_rank=0,
        hidden_size=HIDDEN,
        dtype=DTYPE,
        max_chunk_bytes=2 * 1024 * 1024,
        data_plane=plane,
        device=device,
    )
    try:
        await transport.infos(60)
        link = transport.links[0]
        assert link.data_plane == plane, (link.data_plane, plane)
        out: dict[str, dict[str, float]] = {}
        mb = 0
        hot: DirectLink | None = None
        if direct:
            links = transport.direct_links(TOP_K)
            assert links is not None, f"the {plane} plane offers no hot path here"
            hot = links[0]
        wake = Wake()
        loop = asyncio.get_running_loop()
        for n in tokens:
            dispatch = _dispatch(n, device)
            _sync(device)
            times: list[float] = []
            returns: list[float] = []
            for i in range(iters + 3):  # 3 warm-up round trips (CUDA graph capture on the expert side)
                mb += 1
                if hot is not None:  # timed on the posting thread
                    hidden, returned, elapsed = await loop.run_in_executor(
                        None, timed_direct, hot, wake, mb, dispatch
                    )
                    result = ExchangeResult(hidden)
                else:
                    start = time.perf_counter()
                    result = await transport.exchange(0, mb, 0, dispatch)
                    returned = time.perf_counter() - start
                    if result.ready is not None:  # the GPU fast plane returns before its copy out ran
                        result.ready.synchronize()
                    elapsed = time.perf_counter() - start
                if i >= 3:
                    times.append(elapsed)
                    returns.append(returned)
            assert result.hidden.shape == (n, HIDDEN)
            wrong = _rel_err(result.hidden, refs, n)  # the last round trip's against the part's own
            hops = _hops(link, iters)
            verdicts = VERDICTS[-iters:]
            VERDICTS.clear()
            if hot is not None and gate_us > 0:  # the same again with the host ahead: device-side times
                for _ in range(iters + 1):
                    mb += 1
                    hidden, _, _ = await loop.run_in_executor(
                        None, timed_direct, hot, wake, mb, dispatch, gate_us
                    )
                wrong = max(wrong, _rel_err(hidden, refs, n))
                VERDICTS.clear()
            device_ms, ahead = sorted(DEVICE[-iters:]), AHEAD[-iters:]
            DEVICE.clear()
            AHEAD.clear()
            if verdicts:
                hops = {**hops, "post_to_verdict": statistics.median(verdicts) * 1e6}
            payload = 2 * n * HIDDEN * DTYPE.itemsize  # hidden rows out and results back
            ms = statistics.median(times) * 1e3
            out[str(n)] = {
                "ms": ms,
                "p10_ms": sorted(times)[len(times) // 10] * 1e3,
                "GB_s": payload / ms / 1e6,
                "returned_ms": statistics.median(returns) * 1e3,
                "rel_err": wrong,
                **({"hops_us": hops} if hops else {}),
            }
            if device_ms:  # host ahead: the device-side round trip
                out[str(n)]["device_ms"] = statistics.median(device_ms)
                out[str(n)]["device_p10_ms"] = device_ms[len(device_ms) // 10]
                out[str(n)]["host_ahead"] = sum(ahead) / len(ahead)
                print(f"  {plane:9s} {n:6d} tokens: host ahead by a {gate_us:.0f} µs gate: "
                      f"{out[str(n)]['device_ms']:.3f} ms median on the device "
                      f"(p10 {out[str(n)]['device_p10_ms']:.3f}; post returned before the gate ended "
                      f"in {out[str(n)]['host_ahead']:.0%})", flush=True)  # fmt: skip
            if hops:
                print(f"  {plane:9s} {n:6d} tokens: hops (µs, median) {hops}", flush=True)
            print(f"  {plane:9s} {n:6d} tokens: {ms:8.3f} ms median "
                  f"(exchange returned after {out[str(n)]['returned_ms']:.3f} ms; "
                  f"rel. error against the part {wrong:.2e})", flush=True)  # fmt: skip
        return out
    finally:
        await transport.close()


def _rel_err(hidden: torch.Tensor, refs: dict[int, torch.Tensor] | None, n: int) -> float:
    """The relative error of a round trip's results against the part's own (-1: no reference)."""
    if refs is None or n not in refs:
        return -1.0
    ref = refs[n].float()
    return float((hidden.float().to(ref.device) - ref).norm() / ref.norm().clamp_min(1e-30))


def _hops(link: object, iters: int) -> dict[str, float]:
    """GPU fast plane: the median of each hop of the last ``iters`` round trips (µs)."""
    end = getattr(getattr(link, "plane", None), "_end", None)
    timings = list(getattr(end, "timings", []))[-iters:]
    if not timings:
        return {}
    hops = {
        "publish_to_expert_poll": [t.picked - t.published for t in timings],
        "expert_handoff": [t.queue_ns for t in timings],
        "expert_enqueue": [t.compute_ns for t in timings],
        "to_attention_poll": [t.taken - t.picked - t.queue_ns - t.compute_ns for t in timings],
    }
    if all(t.settled for t in timings):  # the hot path settles its tickets on the polling thread, no loop
        hops["poll_to_loop_settle"] = [t.settled - t.taken for t in timings]
        hops["publish_to_settle"] = [t.settled - t.published for t in timings]
    out = {name: statistics.median(v) / 1e3 for name, v in hops.items()}
    device = [t.device_us() for t in timings]  # ASAP_GPU_DEVICE_TIMING=1: events on the tx / rx streams
    if device and all(device):
        out.update({name: statistics.median(d[name] for d in device) for name in device[0]})
    return out


def _part(model: Path, device: str) -> ExpertPart:
    """The expert part the expert rank serves (all ``EXPERTS``), loaded in this process."""
    config = load_config(model)
    with CheckpointReader(model) as reader:
        return ExpertPart.from_source(reader, config, range(EXPERTS), dtype=DTYPE, device=device)


def _refs(model: Path, tokens: list[int], device: str) -> dict[int, torch.Tensor]:
    """Each dispatch's results computed by the same part in this process (the planes are checked
    against them: a wrong or skipped expert step shows, however fast it was)."""
    part = _part(model, device)
    out = {}
    for n in tokens:
        d = _dispatch(n, device)
        out[n] = part.compute(0, d.hidden, d.expert_ids, d.weights)
    _sync(device)
    return out


def _compute_ms(model: Path, tokens: list[int], device: str) -> dict[str, float]:
    """The expert computation alone (same part, same rows), for reference."""
    part = _part(model, device)
    out = {}
    for n in tokens:
        d = _dispatch(n, device)
        for _ in range(3):
            part.compute(0, d.hidden, d.expert_ids, d.weights)
        _sync(device)
        start = time.perf_counter()
        for _ in range(10):
            part.compute(0, d.hidden, d.expert_ids, d.weights)
        _sync(device)
        out[str(n)] = (time.perf_counter() - start) / 10 * 1e3
    return out


def _device_compute_ms(model: Path, tokens: list[int], device: str) -> dict[str, float]:
    """The expert computation on the GPU alone (CUDA events around the graph replay the GPU fast plane's
    expert side runs: ids translated on the device, no host check), for reference."""
    config = load_config(model)
    with CheckpointReader(model) as reader:
        part = ExpertPart.from_source(reader, config, range(EXPERTS), dtype=DTYPE, device=device)
    out = {}
    for n in tokens:
        d = _dispatch(n, device)
        local, _ = part.device_local_ids(d.expert_ids)
        for _ in range(3):
            part.compute_local(0, d.hidden, local, d.weights)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            part.compute_local(0, d.hidden, local, d.weights)
        end.record()
        end.synchronize()
        out[str(n)] = start.elapsed_time(end) / 20
    return out


async def run() -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1024,8192")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks: gRPC bytes against shared memory")
    parser.add_argument(
        "--planes", help="comma-separated planes, gRPC bytes first (default: all of the kind)"
    )
    parser.add_argument(
        "--direct", action="store_true", help="the fast plane through the hot path (a posting thread)"
    )
    parser.add_argument(
        "--host-ahead-us",
        type=float,
        default=0.0,
        help="with --direct on a GPU: hold the posting stream this long on the device before each post, "
        "and report the device-side round trip (the gate's end until the results are usable) beside "
        "the host-timed one",
    )
    parser.add_argument(
        "--profile-post",
        metavar="FILE",
        help="with --direct: run the host-timed round trips under cProfile (their times are then not "
        "timings) and write the functions by own time to FILE",
    )
    args = parser.parse_args()
    if args.profile_post and not args.direct:
        parser.error("--profile-post needs --direct")
    if args.profile_post:
        PROFILE.append(cProfile.Profile())
    if args.host_ahead_us and (args.cpu or not args.direct):
        parser.error("--host-ahead-us needs --direct on a GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    global DTYPE
    if args.cpu:
        DTYPE = torch.float32
    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.cpu:
        raise SystemExit("needs a CUDA GPU (or --cpu)")
    local = "cpu" if args.cpu else "cuda:0"
    fast_plane = "shm" if args.cpu else "cuda-ipc"
    compared = ("grpc", "shm", "fast") if args.cpu else ("grpc", fast_plane, "fast")
    if args.planes:
        compared = tuple(args.planes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(
            Path(tmp) / "m",
            layers=1,
            hidden=HIDDEN,
            experts=EXPERTS,
            top_k=TOP_K,
            expert_intermediate=16,
            heads=16,
        )
        results: dict[str, object] = {
            "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
            "gpus": gpus,
            "torch": torch.__version__,
            "hidden": HIDDEN,
            "dtype": str(DTYPE).removeprefix("torch."),
            "top_k": TOP_K,
            "iters": args.iters,
            "expert_compute_ms": _compute_ms(model, tokens, local),
        }
        if not args.cpu:
            results["expert_compute_device_ms"] = _device_compute_ms(model, tokens, local)
            print(f"expert compute: host-timed {results['expert_compute_ms']}, "
                  f"device {results['expert_compute_device_ms']}", flush=True)  # fmt: skip
        refs = _refs(model, tokens, local)
        placements = {"same_device": local, **({"other_gpu": "cuda:1"} if gpus > 1 and not args.cpu else {})}
        for where, device in placements.items():
            print(f"expert rank on {device} ({where})", flush=True)
            proc = ServiceProcess(
                "expert",
                ["-m", "expert_svc", "--model", str(model), "--port", "0", "--device", device,
                 "--dtype", str(DTYPE).removeprefix("torch.")],
            )  # fmt: skip
            try:
                target = proc.wait_ready()
                planes = {
                    plane: await _time_plane(
                        target,
                        plane,
                        tokens,
                        args.iters,
                        local,
                        direct=args.direct and plane == "fast",
                        refs=refs,
                        gate_us=args.host_ahead_us,
                    )
                    for plane in compared
                }
            finally:
                proc.stop()
            entry: dict[str, object] = {"planes": planes}
            for plane in compared[1:]:
                ratios = {n: planes["grpc"][n]["ms"] / planes[plane][n]["ms"] for n in planes["grpc"]}
                entry[f"grpc_over_{plane}"] = ratios
                print(f"  grpc / {plane} time: {ratios}", flush=True)
            results[where] = entry
    results["json"] = args.json
    results["profile_post"] = args.profile_post
    return results


def main() -> None:
    configure_cuda_connections()  # as rank processes do: the attention end runs in this process
    results = asyncio.run(run())
    profile_out = results.pop("profile_post")
    if PROFILE and isinstance(profile_out, str):
        text = io.StringIO()
        stats = pstats.Stats(PROFILE[0], stream=text).sort_stats("tottime")
        stats.print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        Path(profile_out).write_text(text.getvalue())
    out = results.pop("json")
    print(json.dumps(results, indent=1))
    if isinstance(out, str):
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
