"""One module per ``asap`` subcommand, each with ``add_parser(subparsers)``.

``SUMMARIES`` is the one-line help of each, in ``asap --help`` order. It lives here, not in the modules,
so that ``asap --help`` and every command other than the one run never import them: several need torch
(seconds of start-up) for what they do.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

TARGET_ENV = "ASAP_TARGET"
"""Names the scheduler for the commands that talk to a running cluster when ``--target`` is absent."""

SUMMARIES: dict[str, str] = {
    "up": "start scheduler + attention + expert services locally",
    "serve": "run one service (scheduler, attention or expert)",
    "prefill": "prefill one prompt on a running cluster and print its first token",
    "model": "make tiny random checkpoints, inspect checkpoints",
    "bench": "open-loop TTFT benchmark: rate sweep, SLO attainment, mode comparison",
    "trace": "collect, summarize and visualise OpenTelemetry traces",
    "calibrate": "time the expert routine across batch sizes and print the knee (--min-batch-tokens)",
    "simulate": "asap bench --compare on a virtual clock: the services' code in one process, at scale",
}


def add_documented_parser(subparsers: Any, name: str, doc: str | None) -> argparse.ArgumentParser:
    """Register subcommand ``name`` with its summary as help and its module docstring, layout kept, as
    description: the commands whose docstring is their manual all want the same three settings."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=SUMMARIES[name],
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def cluster_target(flag: str | None) -> str:
    """The scheduler address: ``--target``, else ``$ASAP_TARGET``, else the client's default. The client
    is imported here, not at module level, so that ``asap --help`` does not load grpc."""
    from asap.client import DEFAULT_TARGET

    return flag or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def comma_separated(value: str, convert: Callable[[str], _T], what: str) -> list[_T]:
    """``value`` split at commas (empty parts skipped), each part through ``convert``; a ``ValueError``
    there becomes the ``ArgumentTypeError`` argparse reports as a usage error."""
    try:
        return [convert(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {value!r}") from None


def route_skew(value: str) -> float:
    """``--route-skew``: a finite number >= 0."""
    try:
        skew = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not 0 <= skew < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return skew


def add_route_skew_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The cluster flag ``--route-skew`` (``asap up``, ``asap bench --compare``, ``asap simulate``)."""
    parser.add_argument(
        "--route-skew",
        type=route_skew,
        default=None,
        metavar="S",
        help="emulated compute: popularity skew of the random top-k routing, expert of popularity rank r "
        "drawn with weight (r + 1) ** -S, each layer's hot set shared by every attention rank (default 0: "
        "uniform); benchmarks/route_balance.py prints the expert ranks' imbalance a value gives, and 0.3 "
        "reproduces the throughput cost of DeepSeek-V3's real routing at EP32",
    )


def max_inflight(value: str) -> int:
    """``--max-inflight``: an integer >= 1."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return count


def add_max_inflight_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The cluster flag ``--max-inflight`` (``asap up``, ``asap bench --compare``, ``asap simulate``)."""
    parser.add_argument(
        "--max-inflight",
        type=max_inflight,
        default=None,
        metavar="N",
        help="micro-batches in flight per attention rank with dual-batch interleaving on: the scheduler's "
        "and the attention ranks' --max-inflight (default 2)",
    )


def add_client_security_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tls DIR`` and ``--token-file F``, for the commands that call a cluster's scheduler."""
    parser.add_argument(
        "--tls",
        metavar="DIR",
        default=None,
        help="mutual TLS with the client certificate in DIR (DIR/client as `asap up --tls DIR` made it, or "
        "DIR itself holding tls.crt, tls.key, ca.crt)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help="send 'authorization: Bearer TOKEN', TOKEN the first line of FILE",
    )


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """The ``tls`` and ``token`` keywords of ``AsapClient`` from ``--tls`` and ``--token-file``."""
    from asap.auth import read_tokens
    from asap.rpc.tls import TlsConfig

    tls = TlsConfig.from_dir(args.tls) if getattr(args, "tls", None) else None
    token_file = getattr(args, "token_file", None)
    token = read_tokens(token_file)[0].decode() if token_file else None
    return {"tls": tls, "token": token}
