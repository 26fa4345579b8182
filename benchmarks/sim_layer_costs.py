"""Per-layer time components of one step, as the simulator charges them, for both layouts.

Audit aid for ``asap simulate`` (benchmarks/README.md, "The paper table, round 2"): for one MoE layer of
one step it prints what each part costs under the cost model (``asap.emulation.costs``), so the colocated
DP+EP baseline and the disaggregated async layout can be compared term by term:

- attention: one attention rank's layer (its batch, tensor parallelism N: 1/N of the compute plus two ring
  all-reduces of the hidden states, ``asap.emulation.parallel``), and the all-reduce share of it;
- experts: the slowest expert rank's grouped MLP for the rows routed to it from every attention rank
  (uniform top-k routing drawn at random, as the emulated router does with skew 0), and the mean;
- dispatch and combine: ``pair`` = the largest single transfer at ``link_gbps`` (every transfer runs in
  parallel: ``asap simulate --links pair``, the emulated cluster); ``ports`` = the busiest device's total
  bytes over its port at ``port_gbps`` (``--links ports``, ``asap.sim.links``), the bytes to a rank's own
  devices free;
- sync layer: slowest attention + dispatch + slowest expert + combine (the per-layer critical path of
  DP+EP with an all-to-all; the barrier is the wait for the slowest attention rank);
- async: per-layer busy time of an attention device and of an expert device for the same tokens (the
  layout pipelines them: its throughput bound is the larger of the two and the ports, not their sum).

``python benchmarks/sim_layer_costs.py [--compute emulated:ascend910] [--tokens 512,2048,8192]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from asap.dtypes import dtype_bytes, torch_dtype
from asap.emulation import costs
from asap.emulation.parallel import ALL_REDUCES_PER_LAYER
from asap.emulation.profiles import DeviceProfile, parse_compute
from asap.model.config import ModelConfig, load_config
from asap.wire.chunks import dispatch_bytes


@dataclass(frozen=True)
class System:
    name: str
    attention: int
    tp: int
    experts: int
    colocated: bool


SYSTEMS = (
    System("colocated sync (8 x TP4 attention, 32 expert ranks on the same 32 devices)", 8, 4, 32, True),
    System("disaggregated async (4 x TP4 attention, 16 expert devices)", 4, 4, 16, False),
)


def attention_s(
    config: ModelConfig, profile: DeviceProfile, b: int, layer: int, lengths: list[int], tp: int
) -> tuple[float, float]:
    """(layer time, its all-reduce part) of one attention rank."""
    single = costs.attention_layer_s(config, layer, lengths, profile, b)
    reduce = 0.0
    if tp > 1:
        reduce = ALL_REDUCES_PER_LAYER * costs.all_reduce_s(
            sum(lengths) * config.hidden_size * b, tp, profile
        )
    return single / tp + reduce, reduce


def route(config: ModelConfig, tokens: int, rng: np.random.Generator) -> np.ndarray:  # type: ignore[type-arg]
    """[tokens, top_k] expert ids, uniform without replacement (the emulated router at skew 0)."""
    keys = rng.random((tokens, config.num_experts))
    return np.argpartition(keys, config.top_k, axis=1)[:, : config.top_k]


def step(
    config: ModelConfig,
    profile: DeviceProfile,
    b: int,
    system: System,
    lengths: list[list[int]],
    seed: int = 0,
) -> dict[str, float]:
    """Seconds of each component of one MoE layer for per-rank prompt lengths ``lengths``."""
    layer = config.moe_layer_ids[0]
    rng = np.random.default_rng(seed)
    per_rank = -(-config.num_experts // system.experts)
    attn, reduce = [], []
    rows = np.zeros(system.experts)  # token-expert pairs per expert rank
    used = np.zeros(system.experts)
    dispatched = np.zeros((system.attention, system.experts))  # tokens sent a -> e
    counts_all = np.zeros(config.num_experts)
    for a, ls in enumerate(lengths):
        if ls:
            t, r = attention_s(config, profile, b, layer, ls, system.tp)
        else:
            t, r = 0.0, 0.0
        attn.append(t)
        reduce.append(r)
        tokens = sum(ls)
        if not tokens:
            continue
        ids = route(config, tokens, rng)
        counts_all += np.bincount(ids.ravel(), minlength=config.num_experts)
        owner = ids // per_rank
        for e in range(system.experts):
            dispatched[a, e] = np.count_nonzero((owner == e).any(axis=1))
    for e in range(system.experts):
        c = counts_all[e * per_rank : (e + 1) * per_rank]
        rows[e], used[e] = c.sum(), np.count_nonzero(c)
    expert = [
        costs.expert_call_totals_s(int(rows[e]), int(used[e]), config, profile, b)
        for e in range(system.experts)
    ]
    h, k = config.hidden_size, config.top_k
    send = np.vectorize(lambda n: dispatch_bytes(int(n), h, k, b))(dispatched)  # bytes a -> e
    back = dispatched * h * b  # result bytes e -> a
    local = np.zeros_like(send, dtype=bool)
    if system.colocated:  # expert rank e on device e; attention rank a on devices a*tp .. a*tp+tp-1
        for a in range(system.attention):
            local[a, a * system.tp : (a + 1) * system.tp] = True
    pair_dispatch = send.max() / (profile.link_gbps * 1e9)
    pair_combine = back.max() / (profile.link_gbps * 1e9)
    port = (profile.port_gbps or profile.link_gbps) * 1e9
    lat = profile.link_latency_us * 1e-6
    port_dispatch = (np.where(local, 0, send).sum(axis=1) / system.tp).max() / port + lat
    port_combine = np.where(local, 0, back).sum(axis=0).max() / port + lat
    slow_attn, slow_expert = max(attn), max(expert)
    return {
        "attn_max": slow_attn,
        "attn_min": min(attn),
        "allreduce": max(reduce),
        "expert_max": slow_expert,
        "expert_mean": float(np.mean(expert)),
        "dispatch_pair": float(pair_dispatch),
        "combine_pair": float(pair_combine),
        "dispatch_ports": float(port_dispatch),
        "combine_ports": float(port_combine),
        "sync_pair": slow_attn + pair_dispatch + slow_expert + pair_combine,
        "sync_ports": slow_attn + port_dispatch + slow_expert + port_combine,
        "dummy_1tok": attention_s(config, profile, b, layer, [1], system.tp)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/models/deepseek-v3.2")
    parser.add_argument("--compute", default="emulated:ascend910")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", default="512,2048,8192", help="tokens per attention rank, comma list")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt length the tokens are packed in")
    args = parser.parse_args()
    config = load_config(args.model)
    _, profile = parse_compute(args.compute)
    assert profile is not None
    b = dtype_bytes(torch_dtype(args.dtype))
    print(
        f"{profile.name}: link {profile.link_gbps} GB/s, port {profile.port_gbps} GB/s, latency {profile.link_latency_us} us; "
        f"{config.num_layers} layers ({len(config.moe_layer_ids)} MoE); times in ms per MoE layer"
    )
    cols = [
        "attn_max",
        "allreduce",
        "expert_max",
        "expert_mean",
        "dispatch_pair",
        "combine_pair",
        "dispatch_ports",
        "combine_ports",
        "sync_pair",
        "sync_ports",
        "dummy_1tok",
    ]
    for system in SYSTEMS:
        print(f"\n{system.name}")
        print("| tokens / attention rank | " + " | ".join(cols) + " |")
        print("|---:|" + "---:|" * len(cols))
        for tokens in (int(t) for t in args.tokens.split(",")):
            prompts = [args.prompt] * max(1, tokens // args.prompt) if tokens >= args.prompt else [tokens]
            row = step(config, profile, b, system, [prompts] * system.attention)
            print(f"| {tokens} | " + " | ".join(f"{row[c] * 1e3:.2f}" for c in cols) + " |")
    # barrier: one rank holds a long prompt, the others short ones (a step of mixed lengths)
    system = SYSTEMS[0]
    print(
        f"\n{system.name}, one step of mixed lengths: rank 0 one 8192-token prompt, the others one 256-token prompt"
    )
    row = step(config, profile, b, system, [[8192]] + [[256]] * (system.attention - 1))
    print(
        f"slowest attention {row['attn_max'] * 1e3:.2f} ms, fastest {row['attn_min'] * 1e3:.2f} ms: the short ranks wait "
        f"{(row['attn_max'] - row['attn_min']) * 1e3:.2f} ms per layer at the barrier; layer (ports) {row['sync_ports'] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
