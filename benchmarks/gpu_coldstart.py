"""Cold start of a real cluster: TTFT of the first minute after ``ready:`` against later minutes.

Issue 14's target: "the first minute after ``ready:`` serves at the latency of later minutes (±20%)".
One cluster (``asap.cluster.LocalCluster``, as ``asap up`` starts it: MPS where ranks share a GPU,
``CUDA_MODULE_LOADING=EAGER``) is started; as soon as it is ready, one open-loop stream of requests at a
fixed rate runs for ``--duration-s`` (the Azure conversation trace's arrival pattern and prompt lengths,
time-scaled to the rate; no warm-up requests: the first request is sent at ``ready:``). Requests are
grouped by their scheduled send time into windows of ``--window-s``; per window: requests, completed,
TTFT mean/p50/p90, prompt tokens/s. The summary compares the first minute with the minutes after it.

On the GPU machine (the carried wheels in .whl; see benchmarks/README.md, "GPU runs"):

    bash benchmarks/gpu_headline.sh coldstart --out $OUT --rate 24 --duration-s 180     # 1+1 on one GPU
    python3 benchmarks/gpu_coldstart.py --out $OUT --attention 2 --experts 2 --rate 48  # 2 GPUs

Writes OUT/NAME.json (windows, summary, run) and OUT/NAME.md; the cluster's log goes to OUT/NAME.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_common
from gpu_common import LAYER_CONFIGS, MODELS, TRACE, GpuSampler

from asap.bench.runner import RequestRecord, RunOptions, run_requests
from asap.bench.workload import Trace, WorkloadSpec, build_requests
from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster


def say(message: str) -> None:
    gpu_common.say("gpu_coldstart", message)


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def windows(records: list[RequestRecord], window_s: float) -> list[dict[str, Any]]:
    """Per window of scheduled send time: counts, TTFT statistics and prompt tokens/s completed."""
    rows: list[dict[str, Any]] = []
    if not records:
        return rows
    count = int(max(r.scheduled_s for r in records) // window_s) + 1
    for w in range(count):
        members = [r for r in records if w * window_s <= r.scheduled_s < (w + 1) * window_s]
        done = [r for r in members if r.ok]
        ttft = [r.ttft_ms for r in done]
        rows.append(
            {
                "start_s": w * window_s,
                "requests": len(members),
                "completed": len(done),
                "failed": len(members) - len(done),
                "ttft_mean_ms": mean(ttft),
                "ttft_p50_ms": percentile(ttft, 0.5),
                "ttft_p90_ms": percentile(ttft, 0.9),
                "queue_mean_ms": mean([r.queue_ms for r in done if r.queue_ms is not None]),
                "prompt_tok_s": sum(r.prompt_tokens for r in done) / window_s,
            }
        )
    return rows


def summary(records: list[RequestRecord], first_s: float) -> dict[str, Any]:
    """Mean and p90 TTFT of requests sent in the first ``first_s`` against those sent later."""

    def stats(part: list[RequestRecord]) -> dict[str, Any]:
        ttft = [r.ttft_ms for r in part if r.ok]
        return {
            "requests": len(part),
            "failed": sum(1 for r in part if not r.ok),
            "ttft_mean_ms": mean(ttft),
            "ttft_p90_ms": percentile(ttft, 0.9),
        }

    first = stats([r for r in records if r.scheduled_s < first_s])
    later = stats([r for r in records if r.scheduled_s >= first_s])
    ratio = (
        first["ttft_mean_ms"] / later["ttft_mean_ms"]
        if first["ttft_mean_ms"] is not None and later["ttft_mean_ms"]
        else None
    )
    return {
        "first": first,
        "later": later,
        "first_over_later_mean": ratio,
        "within_20pct": None if ratio is None else abs(ratio - 1.0) <= 0.2,
    }


async def drive(
    address: str, rate: float, duration_s: float, timeout_s: float, vocab: int, max_prompt: int
) -> list[RequestRecord]:
    spec = WorkloadSpec(
        arrival="trace", trace=Trace.load(TRACE), requests=None, duration_s=duration_s, seed=0
    )
    requests = build_requests(spec, rate, max_prompt_tokens=max_prompt)
    say(f"{len(requests)} requests over {duration_s:g} s at {rate:g} rps")
    options = RunOptions(seed=0, vocab_size=vocab, timeout_s=timeout_s)
    async with AsapClient(address, timeout_s=timeout_s, retries=0) as client:
        return await run_requests(client, requests, options)


def markdown(doc: dict[str, Any]) -> str:
    run, s = doc["run"], doc["summary"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        f"# {run['name']}: {run['attention']}+{run['experts']} ranks, {run['rate_rps']:g} rps for "
        f"{run['duration_s']:g} s from `ready:`",
        "",
        f"- model `{run['model']}`, {run['dtype']}, device {run['device']}, mps {run['mps']}, "
        f"start-up {run['startup_s']:.1f} s; command `{run['command']}`",
        f"- first {run['first_s']:g} s: TTFT mean {ms(s['first']['ttft_mean_ms'])} ms, p90 "
        f"{ms(s['first']['ttft_p90_ms'])}; later: mean {ms(s['later']['ttft_mean_ms'])} ms, p90 "
        f"{ms(s['later']['ttft_p90_ms'])}; first / later = "
        f"{'-' if s['first_over_later_mean'] is None else format(s['first_over_later_mean'], '.2f')}",
        "",
        "| from s | requests | failed | TTFT mean | p50 | p90 | queue mean | prompt tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in doc["windows"]:
        lines.append(
            f"| {w['start_s']:g} | {w['requests']} | {w['failed']} | {ms(w['ttft_mean_ms'])} | "
            f"{ms(w['ttft_p50_ms'])} | {ms(w['ttft_p90_ms'])} | {ms(w['queue_mean_ms'])} | {w['prompt_tok_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results directory (default $OUT)")
    parser.add_argument("--name", default="gpu_coldstart")
    parser.add_argument("--layers", type=int, choices=sorted(LAYER_CONFIGS), default=16)
    parser.add_argument("--model", help="model spec (default random:benchmarks/models/<config of --layers>)")
    parser.add_argument("--attention", type=int, default=1)
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--rate", type=float, default=24.0, help="offered rate, rps (below saturation)")
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--first-s", type=float, default=60.0, help="the start-up window compared")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, s")
    args = parser.parse_args()
    if not args.out:
        parser.error("--out (or $OUT) is required")
    # The launcher's own lines (the MPS decision, a WARNING when ranks share a GPU without MPS).
    logging.basicConfig(level=logging.INFO, format="[launcher] %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    model = args.model or f"random:{(MODELS / LAYER_CONFIGS[args.layers]).relative_to(ROOT)}"
    spec = ClusterSpec(
        model=model,
        attention=args.attention,
        experts=args.experts,
        device=args.device,
        dtype=args.dtype,
        mps=args.mps,
        port=0,
    )
    log_path = out / f"{args.name}.log"
    gpu = GpuSampler()
    with log_path.open("w") as log:
        cluster = LocalCluster(spec, out=log)
        started = time.monotonic()
        say(f"starting {args.attention}+{args.experts} ranks of {model} on {args.device} (log {log_path})")
        address = cluster.start()
        startup_s = time.monotonic() - started
        mps = cluster._mps.decision if cluster._mps is not None else None
        child_env = {k: v for k, v in cluster._child_env.items() if k.startswith("CUDA")}
        say(f"ready: scheduler at {address} after {startup_s:.1f} s")
        gpu.start()
        gpu.phase = "load"
        try:
            from asap.model.config import load_config
            from asap.model.resolve import resolve_model

            config = load_config(resolve_model(model))
            records = asyncio.run(
                drive(
                    address,
                    args.rate,
                    args.duration_s,
                    args.timeout,
                    config.vocab_size,
                    config.max_position_embeddings,
                )
            )
        finally:
            gpu.stop()
            cluster.stop()
    doc = {
        "windows": windows(records, args.window_s),
        "summary": summary(records, args.first_s),
        "gpu": gpu.summary("load"),
        "run": {
            "name": args.name,
            "model": model,
            "attention": args.attention,
            "experts": args.experts,
            "device": args.device,
            "dtype": args.dtype,
            "mps": args.mps,
            "rate_rps": args.rate,
            "duration_s": args.duration_s,
            "window_s": args.window_s,
            "first_s": args.first_s,
            "startup_s": startup_s,
            "launcher_env": {
                k: os.environ.get(k) for k in ("CUDA_MODULE_LOADING", "CUDA_MPS_PIPE_DIRECTORY")
            },
            "rank_env": child_env,
            "mps_decision": None if mps is None else {"action": mps.action.value, "reason": mps.reason},
            "command": shlex.join(["python3", "benchmarks/gpu_coldstart.py", *sys.argv[1:]]),
        },
    }
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{args.name}.md").write_text(markdown(doc))
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
