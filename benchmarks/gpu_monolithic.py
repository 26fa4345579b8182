"""Monolithic baseline for the GPU headline: the same model with the same random weights in ONE process on
ONE GPU (attention part and all routed experts in-process, the experts through the same ``ExpertPart``
routine an expert rank runs), over the prompts of the same workload, at maximum throughput.

The prompts are the bench's own: the trace's prompt lengths with the bench's random token ids, for the same
request count, warm-up and seed (``asap.bench.workload``: identical at every rate; only the arrival times
are scaled). They are packed greedily in arrival order into batches of at most ``--max-batch-tokens``
tokens (and ``--max-batch-prompts`` prompts; a longer prompt runs alone) and processed back to back, no
arrival times, nothing else on the GPU. One untimed pass first (CUDA graphs are captured, kernels chosen),
then ``--repeats`` timed passes; the best pass gives prefill tokens/s, and each batch's latency is
reported.

With ``--bench-json`` (a gpu_headline.py result), the workload settings and the model are taken from it
unless given here, and the cluster's prompt tokens/s per mode (completed prompt tokens over the measured
span at the highest rate the mode completed requests at, the bench's ``throughput_tok_s``) is compared:
scaling efficiency = cluster tokens/s / (monolithic tokens/s x GPUs of the cluster).

    bash benchmarks/gpu_headline.sh monolithic --out $OUT --bench-json $OUT/gpu_headline.json
    python benchmarks/gpu_monolithic.py --device cpu --model tiny --dtype float32 --requests 20 --out /tmp/m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_common
from gpu_common import LAYER_CONFIGS, MODELS, TRACE

from asap.bench.workload import Trace, WorkloadSpec, build_requests, default_warmup
from asap.model.attention_part import MoERequest
from asap.model.config import load_config
from asap.model.reference import load_model
from asap.model.resolve import resolve_model


def say(message: str) -> None:
    gpu_common.say("gpu_monolithic", message)


def greedy_batches(prompts: Sequence[list[int]], max_tokens: int, max_prompts: int) -> list[list[list[int]]]:
    """Consecutive prompts packed while the batch stays within ``max_tokens`` and ``max_prompts``."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    tokens = 0
    for prompt in prompts:
        if current and (tokens + len(prompt) > max_tokens or len(current) >= max_prompts):
            batches.append(current)
            current, tokens = [], 0
        current.append(prompt)
        tokens += len(prompt)
    if current:
        batches.append(current)
    return batches


def cluster_gpus(run: dict[str, Any]) -> int | None:
    """GPUs a gpu_headline.py cluster used: rank r runs on GPU r % visible, so min(visible, ranks)."""
    visible = run.get("gpus_visible") or 0
    if not visible or not str(run.get("device", "")).startswith("cuda"):
        return None
    if str(run["device"]) != "cuda":
        return 1  # one explicit device for every rank
    return min(int(visible), max(int(run.get("attention") or 1), int(run.get("experts") or 1)))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cluster_comparison(bench: dict[str, Any], mono_tok_s: float, gpus: int) -> dict[str, Any]:
    """Per mode of a bench document: prompt tokens/s at the highest rate that completed requests (and the
    best over all rates), and the scaling efficiency against ``gpus`` monolithic GPUs."""
    modes: dict[str, Any] = {}
    for mode, body in (bench.get("modes") or {}).items():
        done = [r for r in body.get("results") or [] if r.get("completed") and r.get("rate_rps") is not None]
        if not done:
            modes[mode] = {"error": body.get("error") or "no completed requests"}
            continue
        top = max(done, key=lambda r: r["rate_rps"])
        best = max(done, key=lambda r: r["throughput_tok_s"])
        saturated = top["throughput_rps"] < 0.9 * top["rate_rps"]
        modes[mode] = {
            "rate_rps": top["rate_rps"],
            "completed": top["completed"],
            "throughput_rps": top["throughput_rps"],
            "tok_s": top["throughput_tok_s"],
            "saturated": saturated,
            "best_tok_s": best["throughput_tok_s"],
            "best_at_rate_rps": best["rate_rps"],
            "scaling_efficiency": top["throughput_tok_s"] / (mono_tok_s * gpus),
            "note": None
            if saturated
            else "the cluster kept up with the offered rate here: its capacity is higher, the efficiency is a lower bound",
        }
    return {"gpus": gpus, "monolithic_tok_s": mono_tok_s, "modes": modes}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help="directory for the results (created; default $OUT)"
    )
    parser.add_argument("--name", default="gpu_monolithic")
    parser.add_argument("--bench-json", help="a gpu_headline.py result: workload, model, cluster tokens/s")
    parser.add_argument("--layers", type=int, choices=sorted(LAYER_CONFIGS), default=16)
    parser.add_argument("--model", help="model spec (default: the bench's, else random:<config of --layers>)")
    parser.add_argument("--device", default="cuda", help="one device (default cuda = cuda:0)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--trace", help=f"default: the bench's, else {TRACE.relative_to(ROOT)}")
    parser.add_argument("--requests", type=int, help="measured requests (default: the bench's, else 60)")
    parser.add_argument("--warmup", type=int, help="warm-up requests (default: the bench's, else 10%%)")
    parser.add_argument("--seed", type=int, help="token-id seed (default: the bench's, else 0)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (default 3; the best counts)")
    parser.add_argument(
        "--gpus", type=int, help="GPUs of the cluster (default: those the bench's ranks used, else 2)"
    )
    args = parser.parse_args()
    if not args.out:
        parser.error("--out (or $OUT) is required")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench: dict[str, Any] = json.loads(Path(args.bench_json).read_text()) if args.bench_json else {}
    run, workload = bench.get("run") or {}, bench.get("workload") or {}

    os.chdir(ROOT)  # relative model specs and trace paths are relative to the checkout
    model = (
        args.model or run.get("model") or f"random:{(MODELS / LAYER_CONFIGS[args.layers]).relative_to(ROOT)}"
    )
    trace_path = os.path.relpath(Path(args.trace or run.get("trace") or TRACE).resolve(), ROOT)
    requests = args.requests or workload.get("requests") or 60
    warmup = args.warmup if args.warmup is not None else workload.get("warmup")
    warmup = warmup if warmup is not None else default_warmup(requests, None, 1.0)
    seed = args.seed if args.seed is not None else workload.get("seed") or 0
    gpus = args.gpus or cluster_gpus(run) or 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        say("error: --device cuda but torch sees no GPU")
        return 2

    config = load_config(resolve_model(model))
    spec = WorkloadSpec(
        arrival="trace", trace=Trace.load(trace_path), requests=requests, warmup=warmup, seed=seed
    )
    sequence = build_requests(spec, None, max_prompt_tokens=config.max_position_embeddings)
    measured = [r.token_ids(seed, config.vocab_size) for r in sequence if not r.warmup]
    warm = [r.token_ids(seed, config.vocab_size) for r in sequence if r.warmup]
    batches = greedy_batches(measured, args.max_batch_tokens, args.max_batch_prompts)
    total_tokens = sum(len(p) for p in measured)
    say(
        f"model {model} ({config.num_layers} layers, {config.num_experts} experts top-{config.top_k}) on "
        f"{device}, {args.dtype}; {len(measured)} prompts ({total_tokens} tokens, from {trace_path}, seed "
        f"{seed}, after {len(warm)} warm-up ones) in {len(batches)} batches of <= {args.max_batch_tokens} tokens"
    )

    started = time.perf_counter()
    attention, experts = load_model(model, dtype=dtype, device=device, expert_ranks=1)
    (part,) = experts.parts
    sync(device)
    load_s = time.perf_counter() - started
    say(f"loaded in {load_s:.1f} s (all {config.num_experts} experts on one {device.type} device)")

    def dispatch(request: MoERequest) -> torch.Tensor:
        return part.compute(request.layer, request.hidden, request.topk_ids, request.topk_weights)

    def run_pass(work: Sequence[list[list[int]]]) -> tuple[float, list[float], torch.Tensor]:
        latencies = []
        logits = torch.empty(0)
        sync(device)
        pass_start = time.perf_counter()
        for batch in work:
            batch_start = time.perf_counter()
            logits = attention.forward(batch, dispatch)
            sync(device)
            latencies.append(time.perf_counter() - batch_start)
        return time.perf_counter() - pass_start, latencies, logits

    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_start = time.perf_counter()
        if warm:
            run_pass(greedy_batches(warm, args.max_batch_tokens, args.max_batch_prompts))
        run_pass(batches)  # every batch shape once: graphs captured, kernels selected
        say(f"warm-up pass {time.perf_counter() - warm_start:.1f} s")
        passes = []
        for i in range(args.repeats):
            seconds, latencies, logits = run_pass(batches)
            passes.append((seconds, latencies))
            say(f"pass {i + 1}/{args.repeats}: {seconds:.3f} s, {total_tokens / seconds:.0f} prompt tokens/s")
    best_s, best_latencies = min(passes)
    mono_tok_s = total_tokens / best_s
    last = logits.float()
    batch_tokens = [sum(len(p) for p in b) for b in batches]
    latencies_ms = [1000 * s for s in best_latencies]
    document: dict[str, Any] = {
        "model": model,
        "layers": config.num_layers,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "workload": {
            "trace": trace_path,
            "requests": len(measured),
            "warmup": len(warm),
            "seed": seed,
            "prompt_tokens": total_tokens,
            "from_bench_json": args.bench_json,
        },
        "batching": {
            "max_batch_tokens": args.max_batch_tokens,
            "max_batch_prompts": args.max_batch_prompts,
            "batches": len(batches),
            "batch_tokens_mean": statistics.fmean(batch_tokens),
            "batch_tokens_max": max(batch_tokens),
        },
        "load_s": load_s,
        "pass_seconds": [s for s, _ in passes],
        "tok_s": mono_tok_s,
        "tok_s_median_pass": total_tokens / statistics.median(s for s, _ in passes),
        "batch_latency_ms": {
            "mean": statistics.fmean(latencies_ms),
            "p50": percentile(latencies_ms, 0.5),
            "p90": percentile(latencies_ms, 0.9),
            "max": max(latencies_ms),
        },
        "per_batch": [
            {"prompts": len(batch), "tokens": t, "ms": ms}
            for batch, t, ms in zip(batches, batch_tokens, latencies_ms, strict=True)
        ],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "last_logits": {
            "finite": bool(torch.isfinite(last).all()),
            "std": float(last.std()),
            "max_abs": float(last.abs().max()),
        },
        "command": shlex.join(["python", "benchmarks/gpu_monolithic.py", *sys.argv[1:]]),
    }
    if bench:
        document["cluster"] = cluster_comparison(bench, mono_tok_s, gpus)
    (out / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(document))
    print(markdown(document), flush=True)
    say(f"wrote {out / (args.name + '.json')} and {args.name}.md")
    return 0 if document["last_logits"]["finite"] else 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(doc: dict[str, Any]) -> str:
    w, b, lat = doc["workload"], doc["batching"], doc["batch_latency_ms"]
    lines = [
        f"# Monolithic prefill: `{doc['model']}` ({doc['layers']} layers) on one {doc['device_name']}, "
        f"{doc['dtype']}",
        "",
        f"- {w['requests']} prompts, {w['prompt_tokens']} tokens (`{w['trace']}`, seed {w['seed']}), "
        f"{b['batches']} batches of <= {b['max_batch_tokens']} tokens (mean {b['batch_tokens_mean']:.0f})",
        f"- command: `{doc['command']}`",
        "",
        "| prompt tokens/s (best pass) | median pass | batch latency mean ms | p50 | p90 | max | peak GiB | load s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {doc['tok_s']:.0f} | {doc['tok_s_median_pass']:.0f} | {lat['mean']:.1f} | {lat['p50']:.1f} | "
        f"{lat['p90']:.1f} | {lat['max']:.1f} | "
        f"{'-' if doc['peak_memory_gib'] is None else format(doc['peak_memory_gib'], '.1f')} | "
        f"{doc['load_s']:.1f} |",
    ]
    cluster = doc.get("cluster")
    if cluster:
        lines += [
            "",
            f"Cluster vs {cluster['gpus']} x monolithic ({cluster['gpus']} x {doc['tok_s']:.0f} prompt tokens/s):",
            "",
            "| mode | rate | done rps | cluster prompt tok/s | saturated | scaling efficiency | best tok/s (rate) |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for mode, m in cluster["modes"].items():
            if "error" in m:
                lines.append(f"| {mode} | error: {m['error']} | | | | | |")
                continue
            lines.append(
                f"| {mode} | {m['rate_rps']:g} | {m['throughput_rps']:.2f} | {m['tok_s']:.0f} | "
                f"{'yes' if m['saturated'] else 'no (lower bound)'} | {m['scaling_efficiency']:.1%} | "
                f"{m['best_tok_s']:.0f} ({m['best_at_rate_rps']:g}) |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
