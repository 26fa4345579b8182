"""GPU headline: async vs sync-chunked vs sync on real compute, a Qwen3-30B-A3B-shaped model with random
weights, 2 attention + 2 expert ranks on 2 GPUs (attention rank r and expert rank r share GPU r).

Each mode is one ``asap bench --compare MODE`` run (a fresh local cluster, the identical request sequence
from the Azure LLM conversation trace, replayed at each rate of the sweep), driven like
benchmarks/headline.py (host CPU sampled meanwhile) and with the GPUs sampled through nvidia-smi. Modes
run one after another; each writes its own JSON as soon as it is done, so a run cut short keeps what it
finished, and a mode that would not fit in ``--budget-s`` any more is skipped (and reported so). At the
end the modes are merged into one ``asap bench --compare`` document with ratios, a plot and a markdown
table:

    OUT/NAME.json   the merged bench document + "gpu", "host_cpu", "run" sections
    OUT/NAME.md     the table (markdown), for benchmarks/README.md
    OUT/NAME.png    TTFT p90 and SLO attainment vs rate
    OUT/NAME.log    the clusters' logs

``--probe`` runs only async at two rates with few requests, to find where the cluster saturates, and
prints a suggested sweep and SLO for the full run. On the GPU machine (see benchmarks/README.md):

    bash benchmarks/gpu_headline.sh --probe --out $OUT
    bash benchmarks/gpu_headline.sh --out $OUT --sweep 2,4,8,16 --slo-ttft-ms 2000

Extra arguments after ``--`` go to ``asap bench`` unchanged (e.g. ``-- --optimizations none``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_common
from gpu_common import LAYER_CONFIGS, MODELS, TRACE, GpuSampler, model_layers
from headline import cpu_busy_sampler

from asap.bench.report import compare_document, format_table, write_json, write_plot
from asap.bench.stats import SLO_ATTAINMENT_TARGET, RateResult
from asap.bench.sweep import SweepResult
from asap.cli import main as asap_main

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MAX_LOG_BYTES = 12 * 2**20


@dataclass(frozen=True)
class Preset:
    modes: str
    sweep: str
    requests: int
    name: str


PROBE = Preset(modes="async", sweep="2,16", requests=30, name="gpu_probe")
FULL = Preset(modes="async,sync-chunked,sync", sweep="2,4,8,16", requests=60, name="gpu_headline")


def say(message: str) -> None:
    gpu_common.say("gpu_headline", message)


def sweep_from_json(mode: str, body: dict[str, Any]) -> SweepResult:
    """A mode's ``SweepResult`` back from its ``asap bench --compare`` JSON section."""
    return SweepResult(
        label=mode,
        compute=body.get("compute"),
        cluster=dict(body.get("cluster") or {}),
        results=[RateResult(**r) for r in body.get("results") or []],
        error=body.get("error"),
    )


def markdown(document: dict[str, Any], sweeps: dict[str, SweepResult]) -> str:
    """The results as markdown: the run, one row per (mode, rate), then the summary per mode."""
    run, settings = document["run"], document["config"]
    lines = [
        f"# {run['name']}: {', '.join(sweeps)} on {run['device']} ({run['gpus_visible']} GPUs visible)",
        "",
        f"- model `{run['model']}` ({run['layers']} layers), {run['attention']} attention + {run['experts']} "
        f"expert ranks, compute torch, dtype {run['dtype']}",
        f"- workload: `{run['trace']}` (arrival times time-scaled to each rate, prompt lengths as traced, "
        f"random token ids), {document['workload']['requests']} measured requests per rate after "
        f"{document['workload']['warmup']} warm-up ones, seed {document['workload']['seed']}",
        f"- TTFT SLO {settings['slo_ttft_ms']:g} ms; max SLO RPS = highest rate with >= "
        f"{SLO_ATTAINMENT_TARGET:.0%} of requests within it",
        f"- command: `{run['command']}`",
        f"- wall time {run['seconds']:.0f} s",
        "",
        "| mode | rate | done rps | prompt tok/s | TTFT mean | p50 | p90 | p99 | in SLO | failed | host CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: float | None, spec: str = ".0f") -> str:
        return "-" if value is None else format(value, spec)

    for mode, sweep in sweeps.items():
        if sweep.error is not None:
            lines.append(f"| {mode} | error: {sweep.error.splitlines()[0]} | | | | | | | | | |")
            continue
        for r in sweep.results:
            t = r.ttft_ms
            cpu = "-" if r.host_cpu_busy is None else f"{r.host_cpu_busy:.0%}"
            lines.append(
                f"| {mode} | {cell(r.rate_rps, 'g')} | {r.throughput_rps:.2f} | {r.throughput_tok_s:.0f} | "
                f"{cell(t['mean'])} | {cell(t['p50'])} | {cell(t['p90'])} | {cell(t['p99'])} | "
                f"{r.slo_attainment:.1%} | {r.failed} | {cpu} |"
            )
    lines += [
        "",
        "| mode | max SLO RPS | capacity: done rps at the highest rate | prompt tok/s there | mean TTFT at "
        "the lowest rate | GPU util mean (per GPU) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, sweep in sweeps.items():
        gpu = document["gpu"].get(mode) or []
        util = ", ".join(f"{g['util_mean_pct']:.0f}%" for g in gpu) or "-"
        if sweep.error is not None or not sweep.results:
            lines.append(f"| {mode} | - | - | - | - | {util} |")
            continue
        rated = sorted((r for r in sweep.results if r.rate_rps is not None), key=lambda r: r.rate_rps or 0.0)
        top, low = rated[-1], rated[0]
        lines.append(
            f"| {mode} | {cell(sweep.max_slo_rps, 'g')} | {top.throughput_rps:.2f} | "
            f"{top.throughput_tok_s:.0f} | {cell(low.ttft_ms['mean'])} | {util} |"
        )
    for pair, values in document["ratios"].items():
        lines.append(
            f"\n{pair}: max SLO RPS x{cell(values['max_slo_rps'], '.2f')}, mean TTFT at the lowest rate "
            f"x{cell(values['ttft_mean_at_lowest_rate'], '.2f')}"
        )
    return "\n".join(lines) + "\n"


def probe_advice(sweep: SweepResult, requests: int) -> list[str]:
    """What the probe says about the full run: capacity, low-load TTFT, a sweep and an SLO to use."""
    rated = sorted((r for r in sweep.results if r.rate_rps is not None), key=lambda r: r.rate_rps or 0.0)
    if not rated or all(r.completed == 0 for r in rated):
        return ["probe: nothing completed; see the cluster log"]
    capacity = max(r.throughput_rps for r in rated)
    low = rated[0]
    low_ttft = low.ttft_ms["mean"] or 0.0
    saturated = rated[-1].throughput_rps < 0.9 * (rated[-1].rate_rps or 0.0)
    step = 0.5 if capacity < 4 else 1.0
    rates = sorted({max(step, round(capacity * f / step) * step) for f in (0.25, 0.5, 0.75, 1.0, 1.25)})
    slo = max(100.0, math.ceil(5 * low_ttft / 100.0) * 100.0)
    lines = [
        f"probe: async completed at most {capacity:.2f} rps "
        f"({'saturated' if saturated else 'NOT saturated: raise the top rate'} at "
        f"{rated[-1].rate_rps:g} rps offered); mean TTFT {low_ttft:.0f} ms at {low.rate_rps:g} rps",
        f"probe: suggested full run: --sweep {','.join(f'{r:g}' for r in rates)} --slo-ttft-ms {slo:g} "
        f"(SLO = 5x the low-load mean TTFT); per mode about "
        f"{sum((requests + max(1, requests // 10)) / r for r in rates):.0f} s of load plus start-up",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help="directory for the results (created; default $OUT)"
    )
    parser.add_argument("--name", help=f"file name stem (default {FULL.name}, {PROBE.name} with --probe)")
    parser.add_argument("--probe", action="store_true", help="async only, two rates, few requests")
    parser.add_argument("--layers", type=int, choices=sorted(LAYER_CONFIGS), default=16)
    parser.add_argument("--model", help="model spec (default random:benchmarks/models/<config of --layers>)")
    parser.add_argument("--modes", help=f"default {FULL.modes} ({PROBE.modes} with --probe)")
    parser.add_argument("--sweep", help=f"rates, rps (default {FULL.sweep}; {PROBE.sweep} with --probe)")
    parser.add_argument(
        "--requests", type=int, help=f"measured per rate (default {FULL.requests}; {PROBE.requests})"
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda: rank r on cuda:{r %% GPUs}")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, s")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="skip a mode that would end past this (default 540)"
    )
    args, extra = parser.parse_known_args()
    if not args.out:
        parser.error("--out (or $OUT) is required")
    extra = [a for a in extra if a != "--"]
    preset = PROBE if args.probe else FULL
    modes = (args.modes or preset.modes).split(",")
    sweep = args.sweep or preset.sweep
    requests = args.requests or preset.requests
    name = args.name or preset.name
    model = args.model or f"random:{(MODELS / LAYER_CONFIGS[args.layers]).relative_to(ROOT)}"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trace = str(Path(args.trace).resolve())
    os.chdir(ROOT)  # relative model specs (the default) are relative to the checkout
    log_path = out / f"{name}.log"
    log_path.unlink(missing_ok=True)

    # Children (the services) import asap from this checkout, whatever the caller's directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    gpus_visible = _gpu_count()
    say(
        f"{name}: modes {','.join(modes)}, model {model}, {args.attention}+{args.experts} ranks on "
        f"{args.device} ({gpus_visible} GPUs visible), {args.dtype}, sweep {sweep} rps x {requests} requests, "
        f"SLO {args.slo_ttft_ms:g} ms, budget {args.budget_s:.0f} s; results in {out}"
    )
    if args.device.startswith("cuda") and gpus_visible == 0:
        say("warning: no GPU visible to torch; the ranks will fail to start")

    cpu_samples: list[float] = []
    cpu_stop = threading.Event()
    cpu_thread = threading.Thread(target=cpu_busy_sampler, args=(cpu_samples, cpu_stop), daemon=True)
    cpu_thread.start()
    gpu = GpuSampler()
    gpu.start()
    started = time.monotonic()
    sweeps: dict[str, SweepResult] = {}
    base: dict[str, Any] | None = None
    mode_seconds: dict[str, float] = {}
    for mode in modes:
        elapsed = time.monotonic() - started
        longest = max(mode_seconds.values(), default=0.0)
        if mode_seconds and elapsed + 1.2 * longest > args.budget_s:
            say(f"skipping {mode}: {elapsed:.0f} s spent, a mode took up to {longest:.0f} s")
            sweeps[mode] = SweepResult(
                label=mode, compute="torch", error=f"skipped: time budget ({args.budget_s:.0f} s)"
            )
            continue
        part = out / f"{name}.{mode}.json"
        part.unlink(missing_ok=True)  # never merge a stale result of an earlier run
        argv = [
            "bench", "--compare", mode, "--model", model, "--attention", str(args.attention),
            "--experts", str(args.experts), "--compute", "torch", "--device", args.device,
            "--dtype", args.dtype, "--trace", trace, "--slo-ttft-ms", f"{args.slo_ttft_ms:g}",
            "--sweep", sweep, "--requests", str(requests), "--timeout", f"{args.timeout:g}",
            "--json", str(part), "--cluster-log", str(log_path), *extra,
        ]  # fmt: skip
        say(f"{mode}: starting (asap {shlex.join(argv)})")
        gpu.phase = mode
        mode_started = time.monotonic()
        try:
            code = asap_main(argv)
        except Exception as exc:  # one mode's crash must not lose the others
            say(f"{mode}: asap bench raised {type(exc).__name__}: {exc}")
            code = -1
        gpu.phase = "idle"
        mode_seconds[mode] = time.monotonic() - mode_started
        if part.is_file():
            document = json.loads(part.read_text())
            base = base or document
            sweeps[mode] = sweep_from_json(mode, document["modes"][mode])
        else:
            sweeps[mode] = SweepResult(
                label=mode, compute="torch", error=f"no results: asap bench exited with code {code}"
            )
        say(f"{mode}: done in {mode_seconds[mode]:.0f} s (exit code {code})")
    gpu.stop()
    cpu_stop.set()
    cpu_thread.join()
    seconds = time.monotonic() - started

    settings = dict(base["config"]) if base else {"slo_ttft_ms": args.slo_ttft_ms}
    settings["modes"] = modes
    workload = base["workload"] if base else {"requests": requests, "warmup": None, "seed": 0}
    document = compare_document(sweeps, settings, workload)
    document["run"] = {
        "name": name,
        "probe": args.probe,
        "model": model,
        "layers": model_layers(model),
        "attention": args.attention,
        "experts": args.experts,
        "device": args.device,
        "dtype": args.dtype,
        "gpus_visible": gpus_visible,
        "trace": os.path.relpath(trace, ROOT),
        "sweep": sweep,
        "requests": requests,
        "seconds": seconds,
        "mode_seconds": mode_seconds,
        "command": shlex.join(["bash", "benchmarks/gpu_headline.sh", *sys.argv[1:]]),
    }
    document["gpu"] = {mode: gpu.summary(mode) for mode in modes}
    document["host_cpu"] = {
        "cores": os.cpu_count(),
        "busy_mean": statistics.fmean(cpu_samples) if cpu_samples else None,
        "busy_p90": statistics.quantiles(cpu_samples, n=10)[-1] if len(cpu_samples) >= 10 else None,
        "note": "whole host, all processes; sampled once per second during the run",
    }
    json_path = out / f"{name}.json"
    write_json(document, json_path)
    (out / f"{name}.md").write_text(markdown(document, sweeps))
    try:
        write_plot(sweeps, float(settings["slo_ttft_ms"]), out / f"{name}.png")
    except Exception as exc:  # a missing matplotlib must not lose the numbers
        say(f"no plot: {exc}")
    for mode in modes:  # merged into NAME.json now
        (out / f"{name}.{mode}.json").unlink(missing_ok=True)
    _trim_log(log_path)
    print(format_table(sweeps, float(settings["slo_ttft_ms"])), flush=True)
    for mode, summary in document["gpu"].items():
        if summary:
            per_gpu = ", ".join(
                f"GPU{g['gpu']} {g['util_mean_pct']:.0f}% busy, {g['memory_max_mib'] / 1024:.1f} GiB"
                for g in summary
            )
            say(f"{mode}: {per_gpu}")
    if args.probe and modes and sweeps.get(modes[0]) is not None:
        for line in probe_advice(sweeps[modes[0]], requests):
            say(line)
    say(f"wrote {json_path}, {name}.md, {name}.png, {name}.log in {out} ({seconds:.0f} s)")
    return 1 if any(s.error is not None for s in sweeps.values()) else 0


def _gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0


def _trim_log(path: Path) -> None:
    """Keep the log under the size that comes back from the device machine (its last part)."""
    if path.is_file() and path.stat().st_size > MAX_LOG_BYTES:
        data = path.read_bytes()[-MAX_LOG_BYTES:]
        path.write_bytes(b"[... earlier lines cut ...]\n" + data[data.find(b"\n") + 1 :])


if __name__ == "__main__":
    sys.exit(main())
