"""``asap serve attention|expert``: run one service in the foreground (what docker/k8s run)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from asap.commands import SUMMARIES
from asap.dataplane.select import DATA_PLANES
from asap.dtypes import DTYPES
from asap.modes import MODES
from asap.optimizations import parse_optimizations


def _tls_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group(
        "mutual TLS (all three or none; without them $ASAP_TLS_DIR, a directory of tls.crt/tls.key/ca.crt)"
    )
    tls.add_argument(
        "--tls-cert", metavar="FILE", help="this service's certificate, presented to clients and to peers"
    )
    tls.add_argument("--tls-key", metavar="FILE", help="its private key")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="the CA that signs every peer: clients without a certificate from it (or plaintext) are refused",
    )


def tls_config(args: argparse.Namespace, role: str) -> Any:
    """The service's ``TlsConfig`` from its flags (or $ASAP_TLS_DIR), None for plaintext."""
    from asap.rpc.tls import tls_from_flags

    return tls_from_flags(
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_ca", None),
        role=role,
    )


def _common(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument(
        "--optimizations",
        default="all",
        help="all (default), none, or a comma list of min-batch, dual-batch, expert-overlap, layer-agnostic",
    )
    parser.add_argument("--model", default="tiny", help="checkpoint dir, 'tiny' (built-in) or random:DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=default_port, help="port (0 picks a free one)")
    parser.add_argument("--dtype", default=DTYPES[0], choices=DTYPES)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--rank", type=int, default=0, help="this rank's index")
    parser.add_argument(
        "--compute",
        default="torch",
        help="torch (real math) or emulated:DEVICE (sleep for the modeled time of DEVICE, e.g. emulated:h200)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: $ASAP_TORCH_THREADS, else torch's default). Services sharing "
        "a machine's cores should split them: oversubscribed OpenMP threads stall every rank.",
    )
    parser.add_argument(
        "--data-plane",
        default="auto",
        choices=DATA_PLANES,
        help="how activations move between ranks: auto (the fast plane's descriptor rings where both ends "
        "accept them: same-host CPU ranks, and same-host GPU ranks with cuda.bindings, over CUDA IPC slots and "
        "stream flags; else POSIX shared memory between same-host CPU ranks, CUDA IPC between same-host GPU "
        "ranks; NIXL to a remote expert rank when both ends have the nixl extra; else gRPC bytes), grpc, or "
        "shm / cuda-ipc / fast / nixl (forced; fails if not possible; nixl: NIXL WRITEs over UCX, any host, "
        "see docs/deploy.md)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib asyncio loop")
    _metrics_port(parser)
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default: $ASAP_LOG_LEVEL or INFO)"
    )
    _tls_flags(parser)


def add_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help=SUMMARIES["serve"])
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")

    attention = services.add_parser("attention", help="an attention rank")
    _common(attention, 50061)
    attention.add_argument(
        "--experts", required=True, help="comma-separated HOST:PORT of every expert rank, in rank order"
    )
    attention.add_argument("--max-inflight", type=int, default=2, help="micro-batches in flight on this rank")
    attention.add_argument("--max-chunk-bytes", type=int, default=2 * 1024 * 1024)
    attention.add_argument(
        "--route-skew",
        type=float,
        default=0.0,
        help="emulated compute: skew of random top-k routing (0 = uniform)",
    )
    attention.add_argument(
        "--fast-peer-timeout",
        type=float,
        default=None,
        help="fast data plane: seconds without an expert rank's heartbeat, while dispatches wait, before "
        "its batches fail with UNAVAILABLE (default 5)",
    )
    attention.add_argument(
        "--fast-attach-timeout",
        type=float,
        default=None,
        help="fast data plane: seconds an announced shared-memory link may wait for the expert rank to "
        "attach (default 30)",
    )
    attention.set_defaults(func=_serve_attention)

    expert = services.add_parser("expert", help="an expert rank")
    _common(expert, 50071)
    expert.add_argument("--num-ranks", type=int, default=1, help="how many expert ranks share the experts")
    expert.add_argument("--queue-depth", type=int, default=256, help="chunks waiting for compute, at most")
    expert.set_defaults(func=_serve_expert)

    scheduler = services.add_parser("scheduler", help="the scheduler (the cluster's public endpoint)")
    _common_scheduler(scheduler)
    scheduler.set_defaults(func=_serve_scheduler)


def _common_scheduler(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="checkpoint dir, 'tiny' (built-in) or random:DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    parser.add_argument(
        "--attention", required=True, help="comma-separated HOST:PORT of every attention rank, in rank order"
    )
    parser.add_argument("--mode", default=MODES[0], choices=MODES)
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="prompt tokens per batch, at most")
    parser.add_argument("--max-batch-prompts", type=int, default=64, help="prompts per batch, at most")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="requests waiting to be placed; beyond: RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-inflight", type=int, default=2, help="batches running per attention rank")
    parser.add_argument(
        "--chunk-tokens", type=int, default=8192, help="sync-chunked: prompt tokens per rank per step"
    )
    parser.add_argument(
        "--sync-planner",
        choices=("lpt", "per-rank"),
        default="lpt",
        help="sync modes: lpt (default; one global step packed longest-first over every rank, the best "
        "placement) or per-rank (as vLLM / SGLang DP+EP: a request-count balancer gives each request a "
        "rank, each rank takes its batch from its own FIFO queue)",
    )
    parser.add_argument(
        "--optimizations",
        default="all",
        help="all (default), none, or a comma list of min-batch, dual-batch, expert-overlap, layer-agnostic",
    )
    parser.add_argument(
        "--min-batch-tokens",
        type=int,
        default=0,
        help="min-batch: hold batches until this many tokens (the expert knee; see asap calibrate); 0 = off",
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=50.0, help="min-batch: longest hold of a request"
    )
    parser.add_argument(
        "--dual-batch-max-tokens", type=int, default=16384, help="a batch above this runs alone on its rank"
    )
    parser.add_argument(
        "--cost",
        default=None,
        metavar="A,B,C",
        help="attention cost model a,b,c in ms (a*n + b*n^2 per prompt + c per batch); default: calibrate",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib asyncio loop")
    _metrics_port(parser)
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default: $ASAP_LOG_LEVEL or INFO)"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="P",
        help="also serve the OpenAI-compatible HTTP API (POST /v1/completions, GET /v1/models, GET /health) "
        "on this port of --host (0 picks a free one); default: no HTTP",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name HTTP requests use (GET /v1/models); default: 'tiny' or the model directory's name",
    )

    _tls_flags(parser)
    parser.add_argument(
        "--auth-token-file",
        metavar="FILE",
        default=None,
        help="require 'authorization: Bearer TOKEN' on the public endpoint, TOKEN one of FILE's lines "
        "(re-read on SIGHUP); health and reflection stay open",
    )


def metrics_port(text: str) -> int:
    """``--metrics-port``'s value: a TCP port, 0 for a free one."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {port}")
    return port


def _metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=metrics_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host); 0 picks a free port, "
        "printed as 'metrics of SERVICE at URL'; default: no metrics server",
    )


def configure_torch_threads(threads: int | None) -> None:
    """Apply ``--threads`` (or $ASAP_TORCH_THREADS) before any torch work starts."""
    import os

    import torch

    value = threads if threads is not None else int(os.environ.get("ASAP_TORCH_THREADS", "0") or 0)
    if value > 0:
        torch.set_num_threads(value)


def attention_config(args: argparse.Namespace) -> Any:
    from attention_svc.config import AttentionServiceConfig

    return AttentionServiceConfig(
        model=args.model,
        rank=args.rank,
        expert_targets=[t.strip() for t in args.experts.split(",") if t.strip()],
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        max_inflight_batches=args.max_inflight
        if "dual-batch" in parse_optimizations(args.optimizations)
        else 1,
        max_chunk_bytes=args.max_chunk_bytes,
        compute=args.compute,
        route_skew=args.route_skew,
        data_plane=getattr(args, "data_plane", "auto"),
        **_fast_bounds(args),
        metrics_port=getattr(args, "metrics_port", None),
        tls=tls_config(args, "attention"),
    )


def _fast_bounds(args: argparse.Namespace) -> dict[str, float]:
    """``--fast-peer-timeout`` / ``--fast-attach-timeout`` where given (else the config's defaults)."""
    given = {
        "fast_peer_timeout_s": getattr(args, "fast_peer_timeout", None),
        "fast_attach_timeout_s": getattr(args, "fast_attach_timeout", None),
    }
    return {name: value for name, value in given.items() if value is not None}


def expert_config(args: argparse.Namespace) -> Any:
    from expert_svc.config import ExpertServiceConfig

    return ExpertServiceConfig(
        model=args.model,
        rank=args.rank,
        num_ranks=args.num_ranks,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        queue_depth=args.queue_depth,
        optimizations=parse_optimizations(args.optimizations),
        compute=args.compute,
        data_plane=getattr(args, "data_plane", "auto"),
        metrics_port=getattr(args, "metrics_port", None),
        tls=tls_config(args, "expert"),
    )


def scheduler_config(args: argparse.Namespace) -> Any:
    from asap.errors import InvalidArgument
    from scheduler_svc.config import SchedulerConfig
    from scheduler_svc.costmodel import AttentionCostModel
    from scheduler_svc.server import SchedulerServiceConfig

    optimizations = parse_optimizations(args.optimizations)
    core = SchedulerConfig(
        max_batch_tokens=args.max_batch_tokens,
        max_batch_prompts=args.max_batch_prompts,
        max_queue_requests=args.max_queue,
        max_inflight_per_rank=args.max_inflight if "dual-batch" in optimizations else 1,
        min_batch_tokens=args.min_batch_tokens if "min-batch" in optimizations else 0,
        max_wait_ms=args.max_wait_ms,
        dual_batch_max_tokens=args.dual_batch_max_tokens,
        mode=args.mode,
        chunk_tokens=args.chunk_tokens,
        sync_planner=getattr(args, "sync_planner", "lpt"),
    )
    if args.cost:
        try:
            a, b, c = (float(v) for v in args.cost.split(","))
        except ValueError:
            raise InvalidArgument(f"--cost takes three numbers A,B,C, got {args.cost!r}") from None
        core.cost = AttentionCostModel(a_ms=a, b_ms=b, c_ms=c)
    return SchedulerServiceConfig(
        model=args.model,
        attention_targets=[t.strip() for t in args.attention.split(",") if t.strip()],
        host=args.host,
        port=args.port,
        core=core,
        calibrate=not args.cost,
        http_port=getattr(args, "http_port", None),
        served_model_name=getattr(args, "served_model_name", None) or "",
        metrics_port=getattr(args, "metrics_port", None),
        tls=tls_config(args, "scheduler"),
        auth_token_file=getattr(args, "auth_token_file", None),
    )


def _run_service(
    args: argparse.Namespace,
    log_name: str,
    make_main: Callable[[], Callable[[], Coroutine[Any, Any, None]]],
    *,
    torch_threads: bool,
) -> int:
    """Set up logging (and torch's threads for the ranks that compute) before the service is built, so
    that its construction already logs under its name, then run it until it stops."""
    from asap.logs import setup_logging
    from asap.rpc.server import run_async

    setup_logging(log_name, args.log_level)
    if torch_threads:
        configure_torch_threads(args.threads)
    run_async(make_main(), use_uvloop=not args.no_uvloop)
    return 0


def _serve_scheduler(args: argparse.Namespace) -> int:
    from scheduler_svc.server import SchedulerService

    config = scheduler_config(args)
    return _run_service(args, "scheduler", lambda: SchedulerService(config).run_forever, torch_threads=False)


def _serve_attention(args: argparse.Namespace) -> int:
    from attention_svc.server import AttentionService

    config = attention_config(args)
    return _run_service(
        args, f"attention-{config.rank}", lambda: AttentionService(config).run_forever, torch_threads=True
    )


def _serve_expert(args: argparse.Namespace) -> int:
    from expert_svc.server import ExpertService

    config = expert_config(args)
    return _run_service(
        args, f"expert-{config.rank}", lambda: ExpertService(config).run_forever, torch_threads=True
    )
