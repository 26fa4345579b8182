"""What a cold attention rank pays that a warm one does not: first call vs repeat, per new shape.

The cold-start runs (benchmarks/README.md, "Cold start") replay the identical prompt lengths at every rate,
yet the first rate after start-up serves at a fraction of later rates. This probe separates the suspects on
one GPU, in one process, with the headline's model shapes (Qwen3-30B-A3B: 32/4 heads of 128, hidden 2048):

1. ``sdpa``: ``scaled_dot_product_attention`` of one prompt, first call vs second call, for new prompt
   lengths, under the default backend choice (and what it chose), forced flash and forced cuDNN;
2. ``gemm``: a projection GEMM for new token counts, first vs second call;
3. ``passes``: the 16-layer model (attention part + all experts in process, as gpu_monolithic.py) over the
   trace's first batches twice: per-batch latency of the cold pass vs the same batches again;
   ``--sdpa flash|cudnn|default`` picks the backend (set ``CUDA_MODULE_LOADING=EAGER`` in the
   environment to test eager module loading; it is recorded);
4. the fix: ``--warm-plan`` runs ``asap.warmup``'s attention plan (SDPA at every length bucket, then
   its batches) before the cold pass; ``--no-pad`` turns the bucket padding off (the code before the
   fix), to compare warm speed with and without it.

    python3 benchmarks/gpu_coldprobe.py --json $OUT/coldprobe.json [--sdpa flash] [--skip-micro]
    python3 benchmarks/gpu_coldprobe.py --json $OUT/fixed.json --skip-micro --warm-plan
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
import torch.nn.functional as F

LENGTHS = (97, 233, 517, 1021, 2039, 4093)


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0


def sdpa_probe(backend: str, offset: int) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for base in LENGTHS:
        s = base + offset  # a length no earlier probe used
        q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, s, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 4, s, 128, device="cuda", dtype=torch.bfloat16)

        def call(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> object:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        if backend == "default":
            choice = int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True))  # type: ignore[attr-defined]
            first, second = timed(call), timed(call)
        else:
            chosen = SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.CUDNN_ATTENTION
            choice = int(chosen)
            try:
                with sdpa_kernel([chosen]):
                    first, second = timed(call), timed(call)
            except RuntimeError as exc:
                rows.append({"backend": backend, "tokens": s, "error": str(exc).splitlines()[0]})
                continue
        rows.append(
            {
                "backend": backend,
                "choice": SDPBackend(choice).name if choice >= 0 else choice,
                "tokens": s,
                "first_ms": first,
                "second_ms": second,
            }
        )
    return rows


def gemm_probe() -> list[dict[str, Any]]:
    w = torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16)  # q + k + v projections
    rows = []
    for n in LENGTHS:
        x = torch.randn(n * 3, 2048, device="cuda", dtype=torch.bfloat16)
        rows.append(
            {"tokens": n * 3, "first_ms": timed(lambda x=x: x @ w.T), "second_ms": timed(lambda x=x: x @ w.T)}
        )
    return rows


def passes_probe(model: str, prompts: int, max_tokens: int, warm_plan: bool) -> dict[str, Any]:
    import importlib.util

    # asap.bench's package imports the client (grpc); the probe needs only its workload module.
    loaded = importlib.util.spec_from_file_location("workload", ROOT / "asap" / "bench" / "workload.py")
    assert loaded is not None and loaded.loader is not None
    workload = importlib.util.module_from_spec(loaded)
    sys.modules["workload"] = workload
    loaded.loader.exec_module(workload)
    Trace, WorkloadSpec, build_requests = workload.Trace, workload.WorkloadSpec, workload.build_requests

    from asap.model.attention_part import MoERequest
    from asap.model.config import load_config
    from asap.model.reference import load_model
    from asap.model.resolve import resolve_model

    os.chdir(ROOT)
    config = load_config(resolve_model(model))
    spec = WorkloadSpec(
        arrival="trace",
        trace=Trace.load("benchmarks/workloads/azure_llm_conv_2023.csv"),
        requests=prompts,
        warmup=0,
        seed=0,
    )
    sequence = build_requests(spec, None, max_prompt_tokens=config.max_position_embeddings)
    work = [r.token_ids(0, config.vocab_size) for r in sequence]
    batches: list[list[list[int]]] = [[]]
    for prompt in work:  # consecutive prompts within max_tokens, as gpu_monolithic.greedy_batches
        if batches[-1] and sum(map(len, batches[-1])) + len(prompt) > max_tokens:
            batches.append([])
        batches[-1].append(prompt)
    started = time.perf_counter()
    attention, experts = load_model(model, dtype=torch.bfloat16, device=torch.device("cuda"), expert_ranks=1)
    (part,) = experts.parts
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started

    def dispatch(request: MoERequest) -> torch.Tensor:
        return part.compute(request.layer, request.hidden, request.topk_ids, request.topk_weights)

    result: dict[str, Any] = {"load_s": load_s, "batches": [[len(b), sum(map(len, b))] for b in batches]}
    with torch.inference_mode():
        started = time.perf_counter()
        attention.forward([[0, 1, 2, 3]], dispatch)  # the service's own warm-up today
        torch.cuda.synchronize()
        result["service_warmup_ms"] = (time.perf_counter() - started) * 1000.0
        if warm_plan:
            from asap.warmup import plan_attention_warmup, warm_attention_kernels, warm_prompts

            plan = plan_attention_warmup(config, max_batch_tokens=max_tokens)
            started = time.perf_counter()
            result["plan_sdpa_shapes"] = warm_attention_kernels(attention, plan)
            result["plan_kernels_ms"] = (time.perf_counter() - started) * 1000.0
            started = time.perf_counter()
            for batch in warm_prompts(plan, config.vocab_size):
                attention.forward(batch, dispatch)
            torch.cuda.synchronize()
            result["plan_batches_ms"] = (time.perf_counter() - started) * 1000.0
            result["plan_tokens"] = plan.tokens
        for name in ("cold", "warm", "again"):
            result[name] = [timed(lambda b=b: attention.forward(b, dispatch)) for b in batches]
        result["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    result["cold_over_warm"] = statistics.fmean(result["cold"]) / statistics.fmean(result["warm"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--sdpa", choices=("default", "flash", "cudnn"), default="default")
    parser.add_argument("--model", default="random:benchmarks/models/qwen3-30b-a3b-16l")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--warm-plan", action="store_true", help="run asap.warmup's plan first")
    parser.add_argument("--no-pad", action="store_true", help="SDPA on the exact prompt lengths")
    args = parser.parse_args()
    if args.no_pad:
        import asap.model.layers

        asap.model.layers.attention_length_bucket = lambda n: n  # type: ignore[assignment]
    doc: dict[str, Any] = {
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(),
        "CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING"),
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
        "sdpa_setting": args.sdpa,
        "warm_plan": args.warm_plan,
        "pad": not args.no_pad,
    }
    if args.sdpa == "flash":
        torch.backends.cuda.enable_cudnn_sdp(False)
    elif args.sdpa == "cudnn":
        torch.backends.cuda.enable_flash_sdp(False)
    started = time.perf_counter()
    torch.zeros(1, device="cuda")
    doc["context_ms"] = (time.perf_counter() - started) * 1000.0
    if not args.skip_micro:
        doc["sdpa"] = sdpa_probe("default", 0) + sdpa_probe("flash", 2) + sdpa_probe("cudnn", 4)
        doc["gemm"] = gemm_probe()
    doc["passes"] = passes_probe(args.model, args.prompts, args.max_batch_tokens, args.warm_plan)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    p = doc["passes"]
    print(json.dumps({k: v for k, v in doc.items() if k not in ("passes",)}, indent=1))
    if args.warm_plan:
        print(
            f"warm plan: {p['plan_sdpa_shapes']} SDPA shapes in {p['plan_kernels_ms']:.0f} ms, "
            f"{p['plan_tokens']} tokens of batches in {p['plan_batches_ms']:.0f} ms"
        )
    print(
        f"passes: service warm-up {p['service_warmup_ms']:.0f} ms; cold {sum(p['cold']):.0f} ms, "
        f"warm {sum(p['warm']):.0f} ms, again {sum(p['again']):.0f} ms over {len(p['cold'])} batches"
    )
    print("cold per batch", [round(x) for x in p["cold"]])
    print("warm per batch", [round(x) for x in p["warm"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
