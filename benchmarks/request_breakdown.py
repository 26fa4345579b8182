"""Where one request's time goes on the real services, from the client's send to its answer.

Starts the cluster of ``emulated_layer_cost.py`` (expert ranks, attention ranks, a scheduler; emulated
``h200`` undilated, min-batch off, the fast plane by default), sends 128-token prompts one at a time and
cuts each request's time at timestamps taken inside the processes (``benchmarks/_stamps.py``: a few
wrapped functions append ``time.time_ns`` to a file; one host clock for every process):

    client -> scheduler            client send -> the scheduler's servicer starts the request
    scheduler: admission, batch    -> the assignment goes on the attention rank's stream
    scheduler -> attention         -> the attention servicer takes the assignment
    attention: batch start         -> the first forward step starts on the compute thread
    layers                         -> the last layer's expert results taken
    last combine, LM head          -> the logits (modelled LM head included)
    sampling                       -> the first token sampled
    attention: batch returned      -> the servicer's result is ready
    attention -> scheduler         -> the scheduler has the result
    scheduler: result delivered    -> the scheduler's servicer returns the answer
    scheduler -> client            -> the client has it

Medians over the measured requests; the untraced client TTFT is the one ``emulated_layer_cost.py``
takes (the stamps cost ~15 writes per request). Not tracing: its spans cost more than what they measure.

    python benchmarks/request_breakdown.py --shape 1x1 --warmup 5 --requests 20 [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asap.client import AsapClient
from asap.model.config import load_config
from benchmarks._stamps import BOOT
from benchmarks.emulated_layer_cost import MODEL, _start, modeled_ms

# (hop, from, to): a mark ending in ``$`` is the last of that name inside the request, else the first.
HOPS = (
    ("client -> scheduler", "c0", "s.arrive"),
    ("scheduler: admission, batch", "s.arrive", "s.send"),
    ("scheduler -> attention", "s.send", "a.assign"),
    ("attention: batch start", "a.assign", "a.first"),
    ("layers", "a.first", "a.take$"),
    ("last combine, LM head", "a.take$", "a.logits"),
    ("sampling", "a.sample0", "a.sample1"),
    ("attention: batch returned", "a.sample1", "a.result"),
    ("attention -> scheduler", "a.result", "s.recv"),
    ("scheduler: result delivered", "s.recv", "s.answer"),
    ("scheduler -> client", "s.answer", "c1"),
)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, by thread name (same names summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def _send(
    target: str, tokens: int, warmup: int, requests: int, vocab: int, on_measure: Callable[[], None]
) -> tuple[list[tuple[int, int]], list[float]]:
    """Client send and answer times (``time.time_ns``) of the measured requests, and the TTFT each one
    reports from the scheduler (ms); ``on_measure`` is called before the first measured one."""
    g = torch.Generator().manual_seed(1)
    out: list[tuple[int, int]] = []
    reported: list[float] = []
    async with AsapClient(target) as client:
        for i in range(warmup + requests):
            prompt = torch.randint(0, vocab, (tokens,), generator=g).tolist()
            if i == warmup:
                on_measure()
            start = time.time_ns()
            result = await client.prefill(tokens=prompt)
            if i >= warmup:
                out.append((start, time.time_ns()))
                reported.append(result.ttft_ms)
    return out, reported


def _marks(path: Path) -> list[tuple[int, str]]:
    marks = []
    for line in path.read_text().splitlines():
        name, ns = line.split()
        marks.append((int(ns), name))
    return sorted(marks)


def timelines(marks: list[tuple[int, str]], sent: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Per request (one at a time, so its marks lie inside its client window): first and last time of
    each mark name, the last ones under ``NAME$``."""
    out = []
    for c0, c1 in sent:
        line: dict[str, int] = {"c0": c0, "c1": c1}
        for ns, name in marks:
            if c0 <= ns <= c1:
                line.setdefault(name, ns)
                line[name + "$"] = ns
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="1x1", help="ATTENTIONxEXPERTS")
    parser.add_argument("--plane", default="fast")
    parser.add_argument("--compute", default="emulated:h200")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = load_config(args.model)
    attention, experts = (int(x) for x in args.shape.split("x"))
    stamps = Path(tempfile.mkdtemp()) / "stamps.txt"
    modeled = modeled_ms(args.model, args.compute, experts, args.tokens)
    os.environ["ASAP_BENCH_STAMPS"] = str(stamps)
    procs = _start(args.plane, attention, experts, args.compute, args.model, run=("-c", BOOT))
    cpu: dict[str, float] = {}
    threads: dict[str, dict[str, float]] = {}

    def cpu_start() -> None:
        cpu.update({p.name: _cpu_s(p.proc.pid) for p in procs}, client=time.process_time())
        threads.update({p.name: _threads_s(p.proc.pid) for p in procs})

    try:
        sent, reported = asyncio.run(
            _send(procs[-1].address, args.tokens, args.warmup, args.requests, config.vocab_size, cpu_start)
        )
        cpu_ms = {p.name: (_cpu_s(p.proc.pid) - cpu[p.name]) / args.requests * 1e3 for p in procs}
        cpu_ms["client"] = (time.process_time() - cpu["client"]) / args.requests * 1e3
        thread_ms = {}
        for p in procs:
            now = _threads_s(p.proc.pid)
            before = threads[p.name]
            thread_ms[p.name] = {
                name: (s - before.get(name, 0.0)) / args.requests * 1e3
                for name, s in now.items()
                if s - before.get(name, 0.0) > 0
            }
    finally:
        for p in procs:
            p.stop()
        os.environ.pop("ASAP_BENCH_STAMPS", None)
    lines = timelines(_marks(stamps), sent)
    ttft = statistics.median((c1 - c0) / 1e6 for c0, c1 in sent)
    load = os.getloadavg()
    print(f"{args.shape} {args.plane}: client TTFT p50 {ttft:.2f} ms, at the scheduler "
          f"{statistics.median(reported):.2f} ms, modelled {modeled:.2f} ms (load {load[0]:.2f})")  # fmt: skip
    hops: dict[str, float] = {}
    for name, a, b in HOPS:
        values = [(t[b] - t[a]) / 1e6 for t in lines if a in t and b in t]
        hops[name] = statistics.median(values) if values else float("nan")
        print(f"  {name:30s} {hops[name]:7.3f} ms")
    print("  CPU per request: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items()))
    for name, per in thread_ms.items():
        print(
            f"    {name}: " + ", ".join(f"{t} {ms:.2f}" for t, ms in sorted(per.items(), key=lambda x: -x[1]))
        )
    report = {"cpu_ms_per_request": cpu_ms, "thread_cpu_ms_per_request": thread_ms, "shape": args.shape, "plane": args.plane, "model": str(args.model), "modeled_ms": modeled,
              "ttft_ms_p50": ttft, "scheduler_ttft_ms_p50": statistics.median(reported),
              "hops_ms_p50": hops, "load_average": load}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
