"""Cost of one span, with tracing off and on: is "tracing off costs nothing measurable" true?

Times N iterations of the pattern the services use on their hottest path (one span per layer with two
int attributes) under:

- ``baseline``: the loop body without any span;
- ``off (guarded)``: ``if setup.TRACING_ENABLED:`` around the span, as hot loops do;
- ``off (asap no-op tracer)``: ``get_tracer()`` while unconfigured (what un-guarded code gets);
- ``off (otel NoOpTracer)``: OpenTelemetry's own no-op tracer, for comparison;
- ``on, no exporter``: an SDK TracerProvider without processors (span bookkeeping only);
- ``on, file exporter``: ``configure_tracing`` with ``ASAP_TRACE_FILE`` (BatchSpanProcessor, JSON lines;
  the export work is on the processor's thread, and the flush at the end is included). A tight loop
  outruns the processor's queue (2048 spans), which then drops spans ("Queue full" on stderr): the
  figure is the cost to the instrumented thread, not a sustainable span rate.

Prints ns per iteration (best of --repeats) and, with --json, writes them.

    python benchmarks/tracing_overhead.py [--n 200000] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.telemetry import setup, spans

Body = Callable[[int], None]


def _baseline(n: int) -> None:
    total = 0
    for i in range(n):
        total += i & 7


def _guarded(n: int) -> None:
    tracer = setup.get_tracer()
    total = 0
    for i in range(n):
        if setup.TRACING_ENABLED:
            with tracer.start_as_current_span(
                spans.ATTENTION_LAYER, attributes={spans.LAYER: i, spans.TOKENS: 64}
            ):
                total += i & 7
        else:
            total += i & 7


def _with_tracer(tracer: trace.Tracer) -> Body:
    def body(n: int) -> None:
        total = 0
        for i in range(n):
            with tracer.start_as_current_span(
                spans.ATTENTION_LAYER, attributes={spans.LAYER: i, spans.TOKENS: 64}
            ):
                total += i & 7

    return body


def _best_ns(body: Body, n: int, repeats: int, after: Callable[[], object] | None = None) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        body(n)
        if after is not None:
            after()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    n, repeats = args.n, args.repeats

    results: dict[str, float] = {}
    assert not setup.tracing_enabled()
    results["baseline"] = _best_ns(_baseline, n, repeats)
    results["off (guarded)"] = _best_ns(_guarded, n, repeats)
    results["off (asap no-op tracer)"] = _best_ns(_with_tracer(setup.get_tracer()), n, repeats)
    results["off (otel NoOpTracer)"] = _best_ns(_with_tracer(trace.NoOpTracer()), n, repeats)
    results["on, no exporter"] = _best_ns(_with_tracer(TracerProvider().get_tracer("bench")), n, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spans.jsonl")
        handle = setup.configure_tracing("asap-bench", {setup.TRACE_FILE_ENV: path})
        tracer = setup.get_tracer()
        results["on, file exporter"] = _best_ns(_with_tracer(tracer), n, repeats, handle.force_flush)
        handle.shutdown()
        written = os.path.getsize(path)

    print(f"python {platform.python_version()} on {platform.machine()}, n={n}, best of {repeats}")
    print(f"{'case':<26} {'ns/iter':>10} {'over baseline':>14}")
    for case, ns in results.items():
        print(f"{case:<26} {ns:>10.1f} {ns - results['baseline']:>14.1f}")
    print(f"(file exporter wrote {written / 1e6:.1f} MB)")
    if args.json:
        args.json.write_text(
            json.dumps({"n": n, "repeats": repeats, "ns_per_iter": results}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
