"""The request sequence of a benchmark: when each request is sent and how long its prompt is.

Everything here is pure and deterministic given the seed, so every mode of ``--compare`` (and every run
with the same flags) replays exactly the same sequence. At each rate of a sweep the sequence is the same
draw with its gaps scaled to the rate: only the rate changes between sweep points, not the prompts.

Arrivals (open loop; request 0 is sent at t=0, the others after a gap each):
    poisson   exponential gaps with mean 1/rate
    gamma     gamma gaps with mean 1/rate and coefficient of variation ``burstiness``
              (shape 1/CV², so CV=1 is Poisson; CV>1 is burstier)
    trace     the trace's own timestamps, relative to its first row, time-scaled so the measured rows
              (warm-up excluded) are offered at the target rate: with ``requests`` their rows-1 gaps
              span (rows-1)/rate, with a duration the window holds rate*duration rows (unscaled when no
              rate is given)

Length specs (prompt tokens, clipped to [1, max_prompt_tokens] of the cluster):
    fixed:N           every prompt N tokens
    uniform:A,B       integers uniform in [A, B], both included
    lognormal:MEAN,SIGMA
                      lognormal with mean MEAN tokens and SIGMA the standard deviation of the log
                      (so the log's mean is ln(MEAN) - SIGMA²/2); the default ``lognormal:1024,0.8`` is
                      close to the Azure conversation trace (mean 1155, p50 1020, p90 2735)
    or a trace CSV (``--trace``): its ``ContextTokens`` column in row order, wrapping around.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from asap.errors import InvalidArgument

ARRIVALS = ("poisson", "gamma", "trace")
DEFAULT_LENGTHS = "lognormal:1024,0.8"
TRACE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


@dataclass(frozen=True, slots=True)
class LengthSpec:
    """A parsed ``--lengths`` value: ``kind`` is fixed, uniform or lognormal; ``params`` its numbers."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """Parse ``fixed:N``, ``uniform:A,B`` or ``lognormal:MEAN,SIGMA``; ``InvalidArgument`` if bad."""
        kind, _, rest = text.partition(":")
        arity = {"fixed": 1, "uniform": 2, "lognormal": 2}
        try:
            params = tuple(float(part) for part in rest.split(",")) if rest else ()
        except ValueError:
            params = ()
        if kind not in arity or len(params) != arity[kind] or not all(map(math.isfinite, params)):
            raise InvalidArgument(
                f"bad length spec {text!r}: expected fixed:N, uniform:A,B or lognormal:MEAN,SIGMA"
            )
        if kind == "fixed" and params[0] < 1:
            raise InvalidArgument(f"fixed length must be >= 1, got {text!r}")
        if kind == "uniform" and not 1 <= params[0] <= params[1]:
            raise InvalidArgument(f"uniform lengths need 1 <= A <= B, got {text!r}")
        if kind == "lognormal" and not (params[0] >= 1 and params[1] >= 0):
            raise InvalidArgument(f"lognormal needs MEAN >= 1 and SIGMA >= 0, got {text!r}")
        return cls(kind, params)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``count`` lengths, unclipped (the caller clips to the cluster's limits)."""
        if self.kind == "fixed":
            return np.full(count, round(self.params[0]), dtype=np.int64)
        if self.kind == "uniform":
            low, high = round(self.params[0]), round(self.params[1])
            return rng.integers(low, high, size=count, endpoint=True)
        mean, sigma = self.params
        log_mean = math.log(mean) - sigma * sigma / 2
        return np.rint(rng.lognormal(log_mean, sigma, size=count)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Trace:
    """A request trace: arrival times in seconds from its first row, and prompt lengths."""

    times_s: np.ndarray
    lengths: np.ndarray

    @property
    def mean_rate_rps(self) -> float:
        """Rows per second over the trace's span (rows-1 gaps over first-to-last time)."""
        span = float(self.times_s[-1] - self.times_s[0])
        return (len(self.times_s) - 1) / span if span > 0 else math.inf

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a CSV with ``TIMESTAMP`` (e.g. ``2023-11-16 18:15:46.6805900``) and ``ContextTokens``."""
        times: list[float] = []
        lengths: list[int] = []
        try:
            with open(path, newline="") as handle:
                for line, row in enumerate(csv.DictReader(handle), start=2):
                    try:
                        times.append(_parse_timestamp(row["TIMESTAMP"]))
                        lengths.append(int(row["ContextTokens"]))
                    except (KeyError, TypeError, ValueError) as exc:
                        raise InvalidArgument(
                            f"{path}:{line}: need TIMESTAMP and ContextTokens columns ({exc})"
                        ) from None
        except OSError as exc:
            raise InvalidArgument(f"cannot read trace {path}: {exc}") from exc
        if len(times) < 2:
            raise InvalidArgument(f"trace {path} needs at least 2 rows, has {len(times)}")
        order = np.argsort(np.asarray(times), kind="stable")
        stamps = np.asarray(times)[order]
        return cls(times_s=stamps - stamps[0], lengths=np.asarray(lengths, dtype=np.int64)[order])


def _parse_timestamp(text: str) -> float:
    # The Azure trace has 7 fractional digits; strptime's %f takes at most 6.
    head, dot, fraction = text.strip().partition(".")
    stamp = datetime.strptime(f"{head}.{(fraction or '0')[:6]}" if dot else f"{head}.0", TRACE_TIME_FORMAT)
    return stamp.timestamp()


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of the sequence: ``send_at_s`` from the start of the run, its prompt length."""

    index: int
    send_at_s: float
    prompt_tokens: int
    warmup: bool

    def token_ids(self, seed: int, vocab_size: int) -> list[int]:
        """The prompt's token ids: uniform in [0, vocab_size), fixed by (seed, index)."""
        rng = np.random.default_rng([seed, self.index, 1])
        ids: list[int] = rng.integers(0, vocab_size, size=self.prompt_tokens).tolist()
        return ids


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to send, independent of the rate: arrival process, lengths, size, seed."""

    arrival: str = "poisson"
    lengths: LengthSpec | None = None
    """None with a trace: the trace's lengths; None without one: ``DEFAULT_LENGTHS``."""
    trace: Trace | None = None
    burstiness: float = 1.0
    requests: int | None = 100
    """Measured requests (warm-up comes on top); exclusive with ``duration_s``."""
    duration_s: float | None = None
    """Measured time window (after warm-up); exclusive with ``requests``."""
    warmup: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise InvalidArgument(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.arrival == "trace" and self.trace is None:
            raise InvalidArgument("--arrival trace needs --trace FILE.csv")
        if self.lengths is not None and self.trace is not None:
            raise InvalidArgument("give either a length spec or a trace, not both")
        if not self.burstiness > 0:
            raise InvalidArgument(f"burstiness (CV) must be > 0, got {self.burstiness}")
        if (self.requests is None) == (self.duration_s is None):
            raise InvalidArgument("give exactly one of requests and duration")
        if self.requests is not None and self.requests < 1:
            raise InvalidArgument(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise InvalidArgument(f"duration must be > 0, got {self.duration_s}")
        if self.warmup < 0:
            raise InvalidArgument(f"warmup must be >= 0, got {self.warmup}")

    def describe(self) -> dict[str, object]:
        """The workload's parameters, for the JSON report."""
        lengths = "trace" if self.trace is not None else (self.lengths_text())
        return {
            "arrival": self.arrival,
            "burstiness": self.burstiness if self.arrival == "gamma" else None,
            "lengths": lengths,
            "requests": self.requests,
            "duration_s": self.duration_s,
            "warmup": self.warmup,
            "seed": self.seed,
        }

    def lengths_text(self) -> str:
        spec = self.lengths or LengthSpec.parse(DEFAULT_LENGTHS)
        return f"{spec.kind}:{','.join(f'{p:g}' for p in spec.params)}"


def _unit_gaps(spec: WorkloadSpec, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` inter-arrival gaps with mean 1 (rate 1/s); the caller divides by the rate."""
    if spec.arrival == "poisson":
        return rng.exponential(1.0, size=count)
    shape = 1.0 / (spec.burstiness * spec.burstiness)
    return rng.gamma(shape, 1.0 / shape, size=count)


def _trace_rows(trace: Trace, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Times and lengths of the first ``count`` rows, wrapping around (each lap shifted by the span
    plus one mean gap, so the rate stays the trace's)."""
    rows = len(trace.times_s)
    laps = -(-count // rows)
    lap_s = float(trace.times_s[-1]) + 1.0 / trace.mean_rate_rps
    times = np.concatenate([trace.times_s + lap * lap_s for lap in range(laps)])[:count]
    return times, np.tile(trace.lengths, laps)[:count]


def build_requests(
    spec: WorkloadSpec, rate_rps: float | None, *, max_prompt_tokens: int
) -> list[BenchRequest]:
    """The request sequence at ``rate_rps`` (None: only for trace arrivals, at the trace's own rate)."""
    if rate_rps is None and spec.arrival != "trace":
        raise InvalidArgument(f"{spec.arrival} arrivals need a rate")
    if rate_rps is not None and not rate_rps > 0:
        raise InvalidArgument(f"rate must be > 0, got {rate_rps}")
    if max_prompt_tokens < 1:
        raise InvalidArgument(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    count = _request_count(spec, rate_rps)
    # Separate streams for gaps and lengths: drawing more of one never shifts the other.
    gap_rng, length_rng = np.random.default_rng([spec.seed, 0]), np.random.default_rng([spec.seed, 2])
    if spec.arrival == "trace":
        assert spec.trace is not None  # checked in WorkloadSpec
        send_at = _trace_send_at(spec, rate_rps, _trace_rows(spec.trace, count)[0])
    else:
        assert rate_rps is not None  # checked above
        send_at = np.concatenate([[0.0], np.cumsum(_unit_gaps(spec, gap_rng, count - 1) / rate_rps)])
    if spec.trace is not None:
        raw_lengths = _trace_rows(spec.trace, count)[1]
    else:
        raw_lengths = (spec.lengths or LengthSpec.parse(DEFAULT_LENGTHS)).sample(length_rng, count)
    lengths = np.clip(raw_lengths, 1, max_prompt_tokens)
    requests = [
        BenchRequest(
            index=i, send_at_s=float(send_at[i]), prompt_tokens=int(lengths[i]), warmup=i < spec.warmup
        )
        for i in range(count)
    ]
    if spec.duration_s is not None and spec.arrival == "trace" and rate_rps is not None:
        return requests[:-1]  # the last row only bounds the window (see _trace_send_at)
    if spec.duration_s is not None:
        measured_from = requests[spec.warmup].send_at_s if spec.warmup < count else 0.0
        requests = [r for r in requests if r.warmup or r.send_at_s - measured_from < spec.duration_s]
    return requests


def _trace_send_at(spec: WorkloadSpec, rate_rps: float | None, times: np.ndarray) -> np.ndarray:
    """Send times of trace rows ``times``: relative to the first row, time-scaled so that the measured
    window is offered at ``rate_rps`` (None: the trace's own timing).

    The scale comes from the measured rows alone (not the warm-up before them, nor a margin after them):
    a trace's local rate varies, so scaling by any other span offers the measured window at a rate other
    than the target. With ``requests`` the measured rows' rows-1 gaps span (rows-1)/rate. With a duration
    the caller draws exactly rate*duration measured rows plus one that bounds the window, and their gaps
    span the duration: the window then holds rate*duration requests, a bursty trace's shape included.
    """
    assert spec.trace is not None  # trace arrivals only
    send_at: np.ndarray = times - times[0]
    if rate_rps is None:
        return send_at
    window = times[min(spec.warmup, len(times) - 1) :]
    span = float(window[-1] - window[0])
    target_span = spec.duration_s if spec.duration_s is not None else (len(window) - 1) / rate_rps
    # Every measured row at one instant has no span to scale: fall back to the trace's mean rate.
    scale = target_span / span if span > 0 else spec.trace.mean_rate_rps / rate_rps
    scaled: np.ndarray = send_at * scale
    return scaled


def _measured_window_requests(duration_s: float, rate_rps: float) -> int:
    """Requests a duration-bounded trace window holds at ``rate_rps`` (at least one)."""
    return max(1, round(rate_rps * duration_s))


def _request_count(spec: WorkloadSpec, rate_rps: float | None) -> int:
    """How many requests to draw: exact for ``requests`` and for a trace at a target rate over a duration
    (see ``_trace_send_at``); for other durations enough to cover the window (random arrivals: with a
    wide margin; a trace at its own speed: the rows before the window's end), the surplus cut by time."""
    if spec.requests is not None:
        return spec.warmup + spec.requests
    assert spec.duration_s is not None
    if spec.arrival == "trace" and spec.trace is not None:
        if rate_rps is not None:  # exactly the window's rows, plus the one that bounds it
            return spec.warmup + _measured_window_requests(spec.duration_s, rate_rps) + 1
        return _rows_before(spec.trace, spec.warmup, spec.duration_s) + 1
    rate = rate_rps if rate_rps is not None else spec.trace.mean_rate_rps if spec.trace else 1.0
    expected = rate * spec.duration_s
    return spec.warmup + int(expected + 10 * math.sqrt(expected) * max(1.0, spec.burstiness) + 20)


def _rows_before(trace: Trace, first: int, duration_s: float) -> int:
    """How many rows (wrapping around as ``_trace_rows`` does) come before ``duration_s`` after row
    ``first``, at the trace's own timing."""
    rows = len(trace.times_s)
    lap_s = float(trace.times_s[-1]) + 1.0 / trace.mean_rate_rps
    start = float(trace.times_s[first % rows]) + (first // rows) * lap_s
    laps, rest = divmod(start + duration_s, lap_s)
    return int(laps) * rows + int(np.searchsorted(trace.times_s, rest, side="left"))


def sequence_digest(requests: list[BenchRequest], seed: int) -> str:
    """A short fingerprint of a sequence (times, lengths, seed), to show modes replayed the same one."""
    digest = hashlib.sha256(str(seed).encode())
    for request in requests:
        digest.update(f"{request.send_at_s:.6f}:{request.prompt_tokens};".encode())
    return digest.hexdigest()[:16]


def default_warmup(requests: int | None, duration_s: float | None, rate_rps: float) -> int:
    """10% of the measured requests, capped at 50 (and at least 1 when there are 10 or more)."""
    expected = requests if requests is not None else rate_rps * (duration_s or 0.0)
    return min(50, int(expected // 10))
