"""What a benchmark hands back: the printed table, the JSON document, the plot.

JSON of one target::

    {"target": "HOST:PORT", "compute": .., "emulated": bool, "max_slo_rps": .., "results": [RATE, ..],
     "cluster": {..}, "config": {..}, "workload": {..}}

JSON of ``--compare``::

    {"modes": {MODE: {"max_slo_rps": .., "results": [RATE, ..], "compute": .., "emulated": bool,
                      "cluster": {..}, "error": null | "why"}},
     "ratios": {"A/B": {"max_slo_rps": .., "ttft_mean_at_lowest_rate": ..}},   # first mode vs each other
     "compute": .., "emulated": bool, "config": {..}, "workload": {..}}

RATE is ``asap.bench.stats.RateResult.to_json()``. A ratio is null when either side is missing or zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asap.bench.stats import SLO_ATTAINMENT_TARGET
from asap.bench.sweep import SweepResult


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _lowest_rate_mean_ttft(sweep: SweepResult) -> float | None:
    rated = [r for r in sweep.results if r.rate_rps is not None]
    if not rated:
        return None
    return min(rated, key=lambda r: r.rate_rps or 0.0).ttft_ms["mean"]


def ratios(sweeps: Mapping[str, SweepResult]) -> dict[str, dict[str, float | None]]:
    """The first mode against each other mode: max SLO RPS (higher is better for the first) and mean
    TTFT at the lowest rate (lower is better for the first)."""
    if len(sweeps) < 2:
        return {}
    first, *others = sweeps.values()
    return {
        f"{first.label}/{other.label}": {
            "max_slo_rps": _ratio(first.max_slo_rps, other.max_slo_rps),
            "ttft_mean_at_lowest_rate": _ratio(_lowest_rate_mean_ttft(first), _lowest_rate_mean_ttft(other)),
        }
        for other in others
    }


def _compute_of(sweeps: Mapping[str, SweepResult]) -> str | None:
    return next((s.compute for s in sweeps.values() if s.compute), None)


def target_document(
    target: str, sweep: SweepResult, config: dict[str, Any], workload: dict[str, Any]
) -> dict[str, Any]:
    """The ``--json`` document of a run against one target."""
    body = sweep.to_json()
    return {
        "target": target,
        "compute": sweep.compute,
        "emulated": sweep.emulated,
        "max_slo_rps": body["max_slo_rps"],
        "results": body["results"],
        "cluster": body["cluster"],
        "config": config,
        "workload": workload,
    }


def compare_document(
    sweeps: Mapping[str, SweepResult], config: dict[str, Any], workload: dict[str, Any]
) -> dict[str, Any]:
    """The ``--json`` document of ``--compare``."""
    compute = _compute_of(sweeps)
    return {
        "modes": {mode: sweep.to_json() for mode, sweep in sweeps.items()},
        "ratios": ratios(sweeps),
        "compute": compute,
        "emulated": (compute or "").startswith("emulated"),
        "config": config,
        "workload": workload,
    }


def write_json(document: Mapping[str, Any], path: str | Path) -> None:
    """Write ``document`` as indented JSON (NaN/inf are refused: they are not JSON)."""
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def title(sweeps: Mapping[str, SweepResult], slo_ttft_ms: float) -> str:
    """One line naming what was measured; emulated runs say so first."""
    compute = _compute_of(sweeps)
    emulated = (compute or "").startswith("emulated")
    first = next(iter(sweeps.values())).cluster if sweeps else {}
    model = first.get("model") or "?"
    attention, experts = first.get("attention_ranks") or "?", first.get("expert_ranks") or "?"
    where = f"model {model}, {attention} attention + {experts} expert ranks"
    label = f"EMULATED ({compute}) " if emulated else ""
    return f"{label}asap bench: {where}, compute {compute or 'unreported'}, TTFT SLO {slo_ttft_ms:g} ms"


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(sweeps: Mapping[str, SweepResult], slo_ttft_ms: float) -> str:
    """The human-readable table: one row per (mode, rate), then max SLO RPS and ratios."""
    header = (
        f"{'mode':<13} {'rate':>7} {'done':>5} {'fail':>5} {'rps':>7} {'tok/s':>9} "
        f"{'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'in SLO':>7} {'goodput':>8} {'cpu':>5}"
    )
    lines = [
        title(sweeps, slo_ttft_ms),
        "TTFT in ms (client-side); rates in requests/s; cpu = host CPU busy while the rate ran",
        header,
    ]
    for mode, sweep in sweeps.items():
        if sweep.error is not None:
            lines.append(f"{mode:<13} error: {sweep.error.splitlines()[0]}")
            continue
        for r in sweep.results:
            ttft = r.ttft_ms
            lines.append(
                f"{mode:<13} {_cell(r.rate_rps, '7.2f')} {r.completed:>5} {r.failed:>5} "
                f"{r.throughput_rps:>7.2f} {r.throughput_tok_s:>9.0f} {_cell(ttft['mean'], '8.1f')} "
                f"{_cell(ttft['p50'], '8.1f')} {_cell(ttft['p90'], '8.1f')} {_cell(ttft['p99'], '8.1f')} "
                f"{r.slo_attainment:>7.1%} {r.goodput_rps:>8.2f} "
                f"{'-' if r.host_cpu_busy is None else format(r.host_cpu_busy, '.0%'):>5}"
            )
            if r.client_lag_ms.get("max", 0.0) > 50.0:
                lines.append(f"{'':<13} note: the client sent up to {r.client_lag_ms['max']:.0f} ms late")
            lines.extend(f"{'':<13} WARNING: {warning['message']}" for warning in r.warnings)
    lines.append(f"max SLO-compliant RPS (>= {SLO_ATTAINMENT_TARGET:.0%} within {slo_ttft_ms:g} ms):")
    for mode, sweep in sweeps.items():
        if sweep.error is None:
            lines.append(f"  {mode:<13} {_cell(sweep.max_slo_rps, 'g')}")
    for pair, values in ratios(sweeps).items():
        lines.append(
            f"  {pair}: max SLO RPS x{_cell(values['max_slo_rps'], '.2f')}, "
            f"mean TTFT at the lowest rate x{_cell(values['ttft_mean_at_lowest_rate'], '.2f')}"
        )
    return "\n".join(lines)


def write_plot(sweeps: Mapping[str, SweepResult], slo_ttft_ms: float, path: str | Path) -> None:
    """TTFT p90 and SLO attainment against the rate, one line per mode, as a PNG (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ttft_axes, slo_axes = figure.subplots(1, 2)
    for mode, sweep in sweeps.items():
        points = sorted((r for r in sweep.results if r.rate_rps is not None), key=lambda r: r.rate_rps or 0.0)
        if not points:
            continue
        rates = [r.rate_rps for r in points]
        p90 = [r.ttft_ms["p90"] if r.ttft_ms["p90"] is not None else float("nan") for r in points]
        ttft_axes.plot(rates, p90, marker="o", label=mode)
        slo_axes.plot(rates, [r.slo_attainment for r in points], marker="o", label=mode)
    ttft_axes.axhline(slo_ttft_ms, color="grey", linestyle="--", linewidth=1, label="SLO")
    ttft_axes.set(xlabel="rate (requests/s)", ylabel="TTFT p90 (ms)", title="TTFT p90")
    slo_axes.axhline(SLO_ATTAINMENT_TARGET, color="grey", linestyle="--", linewidth=1, label="90%")
    slo_axes.set(
        xlabel="rate (requests/s)", ylabel="fraction within SLO", title="SLO attainment", ylim=(0, 1.05)
    )
    for axes in (ttft_axes, slo_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title(sweeps, slo_ttft_ms), fontsize=9)
    figure.savefig(path, dpi=120)
