"""``asap calibrate``: measure the expert knee that sets ``--min-batch-tokens``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from asap.commands import SUMMARIES
from asap.dtypes import DTYPES, torch_dtype
from asap.errors import InvalidArgument
from asap.knee import (
    CPU_TOKEN_COUNTS,
    DEFAULT_PLATEAU_FRACTION,
    DEFAULT_TOKEN_COUNTS,
    KneeResult,
    measure_knee,
)
from asap.model.tiny import TINY_SPEC


def add_parser(subparsers: Any) -> None:
    """Register ``asap calibrate``."""
    parser = subparsers.add_parser(
        "calibrate",
        help=SUMMARIES["calibrate"],
        description="Time (torch) or model (emulated:DEVICE) one expert rank's routine for one MoE layer "
        "across batch sizes; the knee is the smallest batch reaching --plateau of the best throughput.",
    )
    parser.add_argument(
        "--model", default=TINY_SPEC, metavar=f"PATH|{TINY_SPEC}", help="config.json is enough"
    )
    parser.add_argument("--compute", default="torch", metavar="torch|emulated:DEVICE")
    parser.add_argument("--experts", type=int, default=1, metavar="M", help="expert ranks (rank 0 is timed)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 otherwise")
    parser.add_argument("--tokens", metavar="N,N,...", help="batch sizes (default depends on the backend)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size; the fastest is kept")
    parser.add_argument("--plateau", type=float, default=DEFAULT_PLATEAU_FRACTION, metavar="FRACTION")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON")
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Calibrate, print the curve table, the knee and the flag to use; optionally write JSON."""
    on_cpu = args.compute.strip() == "torch" and args.device == "cpu"
    dtype = torch_dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
    counts = (
        _parse_counts(args.tokens) if args.tokens else (CPU_TOKEN_COUNTS if on_cpu else DEFAULT_TOKEN_COUNTS)
    )
    result = measure_knee(
        args.model,
        args.compute,
        args.experts,
        counts,
        device=args.device,
        dtype=dtype,
        repeats=args.repeats,
        plateau_fraction=args.plateau,
    )
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result, str(dtype).removeprefix("torch.")), indent=1) + "\n")
    return 0


def format_table(result: KneeResult) -> str:
    """The curve (tokens, ms, TFLOP/s, share of the best) and the knee line."""
    label = " (emulated)" if result.backend.startswith("emulated") else ""
    tflops = result.tflops()
    best = max(tflops.values())
    lines = [
        f"expert curve, backend {result.backend}{label}",
        f"{'tokens':>8} {'ms':>10} {'TFLOP/s':>10} {'of best':>8}",
    ]
    for tokens, seconds in sorted(result.curve.items()):
        mark = "  <- knee" if tokens == result.knee_tokens else ""
        lines.append(
            f"{tokens:>8} {seconds * 1e3:>10.3f} {tflops[tokens]:>10.3f} {tflops[tokens] / best:>8.0%}{mark}"
        )
    lines.append(
        f"knee: {result.knee_tokens} tokens (first batch at >= {result.plateau_fraction:.0%} of the best throughput)"
    )
    lines.append(f"use: --min-batch-tokens {result.knee_tokens}")
    return "\n".join(lines)


def to_json(result: KneeResult, dtype: str) -> dict[str, object]:
    """A JSON-ready record of the calibration."""
    return {
        "backend": result.backend,
        "emulated": result.backend.startswith("emulated"),
        "dtype": dtype,
        "knee_tokens": result.knee_tokens,
        "plateau_fraction": result.plateau_fraction,
        "flops_per_token": result.flops_per_token,
        "ms_by_tokens": {str(n): s * 1e3 for n, s in sorted(result.curve.items())},
        "tflops_by_tokens": {str(n): v for n, v in sorted(result.tflops().items())},
    }


def _parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise InvalidArgument(f"--tokens must be a comma list of ints, got {text!r}") from None
    if not counts or min(counts) <= 0:
        raise InvalidArgument(f"--tokens must list positive ints, got {text!r}")
    return counts
