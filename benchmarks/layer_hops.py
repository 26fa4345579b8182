"""Where one MoE layer's time goes on the emulated fast plane's hot path, hop by hop.

An in-process emulated attention rank (the hot path: its compute thread posts and takes each layer)
and emulated expert processes on the fast plane, the 16-layer Qwen3-30B-A3B-shaped model, 128-token
prompts one at a time, undilated ``emulated:h200``. Each dispatch's timestamps (``time.time_ns``, one
host's clock for both processes) are taken from what the link already carries (the descriptor's send
time, the completion's pick time, queue and compute times) plus two wrapped calls on the attention side
(the post's start, the completion's take) and the compute thread's resume, and printed as medians (µs):

    post -> published        attention compute thread: slot, header, ids, weights, descriptor, bell; on
                             a link that arms (``DirectLink.arm``), the fill runs inside the attention
                             layer's modelled time, which then ends here ("of which layer end ->
                             published", printed below: the part of the post after that time)
    published -> picked      until the expert's poll thread took the descriptor
    picked -> compute start  the expert-side hand-off to the compute thread
    compute                  the expert call (the modelled time plus what the emulation adds)
    compute end -> taken     answer written, completion published, seen by the attention side
    taken -> resumed         the attention compute thread woken and moving the batch on
    resumed -> next post     the attention layer (modelled sleep, or its part before the post when the
                             link arms), combine and split

    python benchmarks/layer_hops.py --experts 1 --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.bench.modeled import slowest_expert_call_s
from asap.dataplane import fast_attention
from asap.emulation import EmulatedAttentionPart, parse_compute
from asap.model.attention_part import MoERequest
from asap.model.config import load_config
from attention_svc import direct_runner
from benchmarks._fast_experts import MODEL, fast_experts

HOPS = (
    "post -> published",
    "published -> picked",
    "picked -> compute start",
    "compute",
    "compute end -> taken",
    "taken -> resumed",
    "resumed -> next post",
)


class _Recorder:
    """Wraps the attention side's post, publish, take and resume to timestamp every dispatch."""

    def __init__(self) -> None:
        self.post_start = 0
        self.layer_end = 0
        self.published: dict[int, tuple[int, int]] = {}  # seq -> (post start, published)
        self.layer_end_to_published: list[float] = []  # µs, per dispatch, where the layer ended in the post
        self.taken: dict[int, tuple[int, int, int, int]] = {}  # seq -> picked, queue, compute, taken
        self.resumed: list[tuple[list[int], int]] = []  # (seqs of the layer, resumed at)
        self.layer_posts: list[int] = []
        self.runners: list[Any] = []  # every DirectRunner made (their spin counters are printed)
        self.on = False

    def install(self) -> None:
        rec = self
        link_end = fast_attention.AttentionLinkEnd
        publish, take = link_end.publish, link_end._take
        runner = direct_runner.DirectRunner
        post, move, init = runner._post, runner._move, runner.__init__
        finish = MoERequest.finish

        def finish_(self: Any) -> None:
            finish(self)
            rec.layer_end = time.time_ns()

        def init_(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            rec.runners.append(self)

        def publish_(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.time_ns()  # the descriptor goes out within this call
            seq, future = publish(self, *args, **kwargs)
            if rec.on:
                rec.published[seq] = (rec.post_start, start)
                if rec.layer_end > rec.post_start:
                    rec.layer_end_to_published.append((start - rec.layer_end) / 1e3)
            return seq, future

        def take_(self: Any, completion: Any, now_ns: int) -> None:
            if rec.on:
                rec.taken[completion.seq] = (
                    completion.picked_unix_ns,
                    completion.queue_ns,
                    completion.compute_ns,
                    time.time_ns(),
                )
            take(self, completion, now_ns)

        def post_(self: Any, batch: Any, layer: Any, dispatches: Any) -> None:
            rec.post_start = now = time.time_ns()
            if rec.on:
                rec.layer_posts.append(now)
            post(self, batch, layer, dispatches)

        def move_(self: Any, batch: Any) -> bool:
            if rec.on and batch.step is not None:
                seqs = [t.plane_data for t in batch.tickets if isinstance(t.plane_data, int)]
                rec.resumed.append((seqs, time.time_ns()))
            result: bool = move(self, batch)
            return result

        link_end.publish = publish_  # type: ignore[method-assign]
        link_end._take = take_  # type: ignore[method-assign]
        runner._post = post_  # type: ignore[method-assign]
        runner._move = move_  # type: ignore[method-assign]
        runner.__init__ = init_  # type: ignore[method-assign]
        MoERequest.finish = finish_  # type: ignore[method-assign]

    def hops(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name in HOPS}
        posts = sorted(self.layer_posts)
        for seqs, resumed in self.resumed:
            layer = [s for s in seqs if s in self.published and s in self.taken]
            if not layer:
                continue
            # the layer's slowest expert rank sets when the compute thread can move on
            seq = max(layer, key=lambda s: self.taken[s][3])
            posted, published = self.published[seq]
            picked, queue, compute, taken = self.taken[seq]
            out["post -> published"].append((published - posted) / 1e3)
            out["published -> picked"].append((picked - published) / 1e3)
            out["picked -> compute start"].append(queue / 1e3)
            out["compute"].append(compute / 1e3)
            out["compute end -> taken"].append((taken - picked - queue - compute) / 1e3)
            out["taken -> resumed"].append((resumed - taken) / 1e3)
            nxt = [p for p in posts if p > resumed]
            if nxt and nxt[0] - resumed < 50e6:
                out["resumed -> next post"].append((nxt[0] - resumed) / 1e3)
        return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each live Python thread of this process, by thread name."""
    out = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[thread.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _modeled_us(experts: int, compute: str, tokens: int) -> tuple[float, float, float]:
    """Modelled attention MoE layer, the slowest expert rank's call and the LM head (µs), one prompt."""
    config = load_config(MODEL)
    profile = parse_compute(compute)[1]
    assert profile is not None
    attention = EmulatedAttentionPart(config, profile)
    call_s = slowest_expert_call_s(config, profile, experts, tokens)
    layer = config.moe_layer_ids[0]
    lm_head = attention.modeled_s([tokens]) - sum(
        attention.layer_s(i, [tokens]) for i in range(config.num_layers)
    )
    return attention.layer_s(layer, [tokens]) * 1e6, call_s * 1e6, lm_head * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compute", default="emulated:h200")
    args = parser.parse_args()
    rec = _Recorder()
    rec.install()
    async with fast_experts(args.experts, args.compute) as (executor, procs):
        walls, heads, tails = [], [], []
        cpu_start = (0.0, 0.0)
        for i in range(args.warmup + args.requests):
            rec.on = i >= args.warmup
            if i == args.warmup:
                cpu_start = (time.process_time(), sum(_cpu_s(p.proc.pid) for p in procs))
                threads_start = _thread_cpu_s()
            posts = len(rec.layer_posts)
            start, start_ns = time.perf_counter(), time.time_ns()
            await executor.run_batch([executor.make_prompt("p", list(range(1, args.tokens + 1)))])
            if rec.on:
                walls.append((time.perf_counter() - start) * 1e3)
                heads.append((rec.layer_posts[posts] - start_ns) / 1e6)
                tails.append((time.time_ns() - rec.resumed[-1][1]) / 1e6)
        layers = args.requests * len(load_config(MODEL).moe_layer_ids)
        cpu_attention = (time.process_time() - cpu_start[0]) / layers * 1e6
        cpu_experts = (sum(_cpu_s(p.proc.pid) for p in procs) - cpu_start[1]) / layers * 1e6
        threads = {
            name: (cpu - threads_start.get(name, 0.0)) / layers * 1e6 for name, cpu in _thread_cpu_s().items()
        }
    attention_us, expert_us, lm_head_us = _modeled_us(args.experts, args.compute, args.tokens)
    hops = rec.hops()
    total = 0.0
    print(f"experts {args.experts}, {args.requests} prompts of {args.tokens} tokens, {args.compute}")
    for name in HOPS:
        values = hops[name]
        med = statistics.median(values) if values else float("nan")
        total += med
        ordered = sorted(values)
        print(
            f"  {name:24s} {med:8.1f} µs  (p10 {ordered[len(values) // 10]:7.1f}, "
            f"mean {statistics.mean(values):7.1f}, "
            f"p90 {ordered[len(values) * 9 // 10]:7.1f}, max {ordered[-1]:8.1f}, n={len(values)})"
        )
    print(f"  {'sum of medians':24s} {total:8.1f} µs")
    if rec.layer_end_to_published:
        ends = rec.layer_end_to_published
        print(
            f"  of post -> published, layer end -> published {statistics.median(ends):.1f} µs "
            f"(median over {len(ends)} dispatches; the fill ran inside the layer's modelled time)"
        )
    print(f"  modelled: attention layer {attention_us:.1f} µs, expert call {expert_us:.1f} µs")
    print(
        f"  per batch: start -> first post {statistics.median(heads):.2f} ms, last results -> batch "
        f"returned {statistics.median(tails):.2f} ms (modelled first attention layer "
        f"{attention_us / 1e3:.2f} ms, last one + LM head {lm_head_us / 1e3 + attention_us / 1e3:.2f} ms)"
    )
    print(
        f"  CPU per MoE layer: attention process {cpu_attention:.0f} µs, expert processes "
        f"{cpu_experts:.0f} µs (all threads)"
    )
    busiest = sorted(threads.items(), key=lambda kv: -kv[1])[:4]
    print("  attention threads, CPU per layer: " + ", ".join(f"{n} {us:.0f} µs" for n, us in busiest))
    for runner in rec.runners:
        spin = runner.spin
        print(
            f"  attention compute thread spin: {spin.hits} hits of {spin.spins} spins (cap {spin.cap_s * 1e6:.0f} µs)"
        )
    print(f"  batch wall p50 {statistics.median(walls):.2f} ms; load average {os.getloadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
