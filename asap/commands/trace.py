"""``asap trace``: collect, summarize and draw traces (JSON lines, OpenTelemetry Collector file format).

    asap trace collect --listen HOST:PORT --out FILE.jsonl     OTLP/gRPC receiver appending to FILE
    asap trace summarize FILE [--json] [--limit N]             per-request TTFT breakdown
    asap trace perfetto FILE OUT.json [--png OUT.png --window START_MS,END_MS]

Point services at a collector with ``OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT``,
or let each write the file itself with ``ASAP_TRACE_FILE=FILE.jsonl``. Exit codes: 0 on success, 2 on bad
input (unreadable or malformed file, bad address or window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from asap.commands import add_documented_parser
from asap.errors import InvalidArgument


def add_parser(subparsers: Any) -> None:
    """Register ``asap trace`` and its subcommands."""
    parser = add_documented_parser(subparsers, "trace", __doc__)
    commands = parser.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")

    collect = commands.add_parser("collect", help="receive OTLP/gRPC traces and append them to a file")
    collect.add_argument(
        "--listen", default="127.0.0.1:4317", metavar="HOST:PORT", help="default: %(default)s"
    )
    collect.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl")
    collect.set_defaults(func=run_collect)

    summarize = commands.add_parser("summarize", help="per-request TTFT breakdown of a trace file")
    summarize.add_argument("file", type=Path, metavar="FILE")
    summarize.add_argument("--json", action="store_true", help="print one JSON object")
    summarize.add_argument("--limit", type=int, default=50, metavar="N", help="table rows (default: 50)")
    summarize.set_defaults(func=run_summarize)

    perfetto = commands.add_parser("perfetto", help="write a Chrome/Perfetto trace (and a PNG timeline)")
    perfetto.add_argument("file", type=Path, metavar="FILE")
    perfetto.add_argument("out", type=Path, metavar="OUT.json")
    perfetto.add_argument("--png", type=Path, metavar="OUT.png", help="also draw a timeline picture")
    perfetto.add_argument("--window", metavar="START_MS,END_MS", help="PNG time window since trace start")
    perfetto.set_defaults(func=run_perfetto)


def _load(path: Path) -> list[Any]:
    from asap.telemetry.otlpjson import load_spans

    try:
        return load_spans(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path}: not a trace file: {exc}") from None


async def _collect(listen: str, out: Path) -> None:
    from asap.telemetry.collector import TraceCollector

    collector = TraceCollector(listen, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        address = await collector.start()
        print(f"collecting traces at {address} -> {out}", flush=True)
        await stop.wait()
    finally:
        await collector.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print(f"collected {collector.spans} spans in {collector.exports} exports", file=sys.stderr)


def run_collect(args: argparse.Namespace) -> int:
    """``asap trace collect``: serve until SIGINT/SIGTERM."""
    try:
        asyncio.run(_collect(args.listen, args.out))
    except (ValueError, OSError) as exc:
        raise InvalidArgument(str(exc)) from None
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    """``asap trace summarize``: table or ``--json``."""
    from asap.telemetry.summary import format_table, summarize

    summary = summarize(_load(args.file))
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    elif not summary.requests:
        print(f"no scheduler.request spans in {args.file}")
    else:
        print(format_table(summary, limit=args.limit))
    return 0


def run_perfetto(args: argparse.Namespace) -> int:
    """``asap trace perfetto``: trace-event JSON, optionally a PNG timeline."""
    from asap.telemetry.perfetto import parse_window, render_png, to_trace_events

    if args.window and not args.png:
        raise InvalidArgument("--window applies to --png; add --png OUT.png")
    try:
        window = parse_window(args.window) if args.window else None
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    records = _load(args.file)
    document = to_trace_events(records)
    args.out.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    print(f"wrote {args.out}: {len(records)} spans, open it at https://ui.perfetto.dev")
    if args.png:
        drawn = render_png(records, args.png, window)
        print(f"wrote {args.png}: {drawn} spans drawn")
    return 0
