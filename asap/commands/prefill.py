"""``asap prefill``: send one prompt to a cluster and print its first token.

Exit codes: 0 on success; 2 when the request fails, with ``asap: error: STATUS: message`` on stderr
(STATUS is the gRPC status code name, e.g. INVALID_ARGUMENT or UNAVAILABLE); argparse's usual 2 for bad
flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from asap.client import DEFAULT_TARGET, AsapClient, AsapError, PrefillResult
from asap.commands import (
    TARGET_ENV,
    add_client_security_flags,
    add_documented_parser,
    client_security,
    cluster_target,
    comma_separated,
)


def _token_list(value: str) -> list[int]:
    tokens = comma_separated(value, int, "token ids")
    if not tokens:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return tokens


def add_parser(subparsers: Any) -> None:
    """Register ``asap prefill``."""
    parser = add_documented_parser(subparsers, "prefill", __doc__)
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=None,
        help=f"scheduler address (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("text", nargs="?", metavar="TEXT", help="prompt text, tokenised by the cluster")
    prompt.add_argument("--tokens", type=_token_list, metavar="1,2,3", help="prompt as token ids")
    parser.add_argument("--top-logprobs", type=int, default=5, metavar="K", help="default: 5")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--ttft-slo-ms", type=int, default=None, metavar="MS")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="deadline (default: 60)")
    parser.add_argument(
        "--retries", type=int, default=2, metavar="N", help="on RESOURCE_EXHAUSTED/UNAVAILABLE"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_security_flags(parser)
    parser.set_defaults(func=run_prefill)


def run_prefill(args: argparse.Namespace) -> int:
    """Send the prompt with the blocking client and print the result or the error."""
    target = cluster_target(args.target)
    try:
        security = client_security(args)
        with AsapClient.connect_sync(
            target, timeout_s=args.timeout, retries=args.retries, **security
        ) as client:
            result = client.prefill(
                tokens=args.tokens,
                text=args.text,
                top_logprobs=args.top_logprobs,
                temperature=args.temperature,
                seed=args.seed,
                ttft_slo_ms=args.ttft_slo_ms,
            )
    except AsapError as exc:
        print(f"asap: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json_dict()))
    else:
        print(format_result(result))
    return 0


def format_result(result: PrefillResult) -> str:
    """A short human-readable summary: one line, then the top logprobs as a small table."""
    lines = [
        f"first token {result.first_token_id} (logprob {result.first_token_logprob:.4f})  "
        f"prompt {result.prompt_tokens} tokens  ttft {result.ttft_ms:.1f} ms  "
        f"request {result.request_id}  trace {result.trace_id or '-'}"
    ]
    if result.top_logprobs:
        lines.append(f"  {'token':>8}  logprob")
        lines.extend(f"  {token_id:>8}  {logprob:.4f}" for token_id, logprob in result.top_logprobs)
    return "\n".join(lines)
