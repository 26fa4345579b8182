"""What a local cluster is: the cluster spec (flags and YAML) and the service commands it starts.

``asap up``, the docker/k8s manifests' checks and ``asap bench --compare`` build on these; the process
management lives in ``asap.cluster``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asap.dtypes import check_dtype_name
from asap.errors import InvalidArgument
from asap.modes import check_mode
from asap.mps import MODES as MPS_MODES
from asap.openai_protocol import served_model_name
from asap.optimizations import format_optimizations, parse_optimizations

GPU_MAX_BATCH_TOKENS = 16384
"""The scheduler's batch bound for a cluster whose attention ranks run on CUDA: on one H200, 1 attention + 1
expert rank reached 1.04-1.05x the monolithic process's tokens/s at saturation with it against 0.74-0.81x
with 8192, the same prompts in one call (benchmarks/README.md, "1+1 against monolithic at 16384 tokens
per batch"). The monolithic process packs batches of 16384 tokens too; the attention ranks warm up to it."""


@dataclass(slots=True)
class RankSpec:
    """Per-rank overrides from a cluster spec (None = cluster default)."""

    port: int = 0
    device: str | None = None
    dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ClusterSpec:
    """What ``asap up`` starts. Built from flags, a YAML file, or both (flags win)."""

    model: str = "tiny"
    attention: int = 2
    experts: int = 2
    mode: str = "async"
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    """The scheduler's port (the cluster's public address)."""
    compute: str = "torch"
    """``torch`` or ``emulated:DEVICE`` for every attention and expert rank."""
    optimizations: str = "all"
    """``all``, ``none`` or a comma list of min-batch, dual-batch, expert-overlap, layer-agnostic."""
    min_batch_tokens: int | None = None
    """min-batch threshold; None: the expert knee, calibrated on this backend (cached per backend)."""
    max_batch_tokens: int | None = None
    """The scheduler's prompt tokens per batch, at most; None: ``GPU_MAX_BATCH_TOKENS`` when the attention
    ranks run on CUDA, else the scheduler's own default (8192). Attention ranks warm up shapes of batches
    up to ``asap.warmup.WARMUP_BATCH_TOKENS`` (16384)."""
    max_inflight: int | None = None
    """Micro-batches in flight per attention rank (the scheduler's and the attention ranks'
    ``--max-inflight``) with dual-batch interleaving on; None: their default (2)."""
    threads: int | None = None
    """torch threads per rank; default: this machine's cores split evenly over the ranks (CPU only)."""
    trace: str | None = None
    """Trace every service into this JSON-lines file through an in-process OTLP collector."""
    mps: str = "auto"
    """CUDA MPS for ranks sharing a GPU: ``auto`` (start a daemon when needed and possible), ``on``, ``off``."""
    http_port: int | None = None
    """The scheduler's OpenAI-compatible HTTP port (0 = any free one); None = no HTTP front door."""
    metrics_port: int | None = None
    """Prometheus metrics: the scheduler's port (0: every service a free port); the other services get
    the next ports, attention ranks then expert ranks (``metrics_ports``). None: no metrics servers."""
    tls: str | None = None
    """Mutual TLS between every service and for clients: a directory made once by ``asap.certs`` (a CA,
    a certificate per service and one for clients, ``DIR/client``); None: plaintext."""
    auth_token_file: str | None = None
    """Bearer tokens the scheduler accepts (one per line, re-read on SIGHUP); None: no token needed."""
    data_plane: str = "auto"
    """``--data-plane`` of every attention and expert rank (``asap.dataplane.select.DATA_PLANES``)."""
    route_skew: float = 0.0
    """Emulated compute only: the popularity skew of the attention ranks' random top-k routing
    (``asap.emulation.routing.RandomRouter``: expert of popularity rank r drawn with weight
    (r + 1) ** -skew, a different hot set per layer, shared by every rank); 0 = uniform. Real compute routes
    with the model's own gate."""
    scheduler_args: list[str] = field(default_factory=list)
    attention_ranks: list[RankSpec] = field(default_factory=list)
    expert_ranks: list[RankSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.attention < 1 or self.experts < 1:
            raise InvalidArgument(
                f"need >= 1 attention and expert rank, got {self.attention} and {self.experts}"
            )
        check_mode(self.mode)
        check_dtype_name(self.dtype)
        if len(self.attention_ranks) > self.attention or len(self.expert_ranks) > self.experts:
            raise InvalidArgument("the spec lists more per-rank entries than ranks")
        self.attention_ranks += [RankSpec() for _ in range(self.attention - len(self.attention_ranks))]
        self.expert_ranks += [RankSpec() for _ in range(self.experts - len(self.expert_ranks))]
        self.optimizations = format_optimizations(parse_optimizations(self.optimizations))
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise InvalidArgument(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise InvalidArgument(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.threads is not None and self.threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {self.threads}")
        if (
            self.metrics_port is not None
            and not 0 <= self.metrics_port <= 65535 - self.attention - self.experts
        ):
            raise InvalidArgument(
                f"metrics_port must leave room for every service's port, got {self.metrics_port}"
            )
        if not 0 <= self.route_skew < float("inf"):
            raise InvalidArgument(f"route_skew must be a finite number >= 0, got {self.route_skew}")
        if self.route_skew and not self.compute.startswith("emulated:"):
            raise InvalidArgument(
                f"route_skew applies to emulated compute (compute emulated:DEVICE), not {self.compute!r}: "
                "real compute routes with the model's own gate"
            )
        if self.mps not in MPS_MODES:
            raise InvalidArgument(f"mps must be one of {', '.join(MPS_MODES)}, got {self.mps!r}")
        from asap.dataplane.select import DATA_PLANES  # here: the spec's readers need no torch otherwise

        if self.data_plane not in DATA_PLANES:
            raise InvalidArgument(
                f"data_plane must be one of {', '.join(DATA_PLANES)}, got {self.data_plane!r}"
            )

    def scheduler_max_batch_tokens(self) -> int | None:
        """The ``--max-batch-tokens`` the scheduler gets: ``max_batch_tokens``, else ``GPU_MAX_BATCH_TOKENS``
        when every attention rank runs on CUDA, else None (the scheduler's default)."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        devices = self.rank_devices(self.attention_ranks)
        return GPU_MAX_BATCH_TOKENS if all(d.startswith("cuda") for d in devices) else None

    def max_inflight_args(self) -> list[str]:
        """The scheduler's and attention ranks' ``--max-inflight`` flag (none: their default)."""
        return [] if self.max_inflight is None else ["--max-inflight", str(self.max_inflight)]

    def route_skew_args(self) -> list[str]:
        """The attention ranks' ``--route-skew`` flag (none for uniform routing, their default)."""
        return ["--route-skew", repr(self.route_skew)] if self.route_skew else []

    def data_plane_args(self) -> list[str]:
        """The ranks' ``--data-plane`` flag (none for ``auto``, the ranks' own default)."""
        return [] if self.data_plane == "auto" else ["--data-plane", self.data_plane]

    def rank_devices(self, ranks: Sequence[RankSpec]) -> list[str]:
        """The torch device of each of ``ranks`` (``attention_ranks`` or ``expert_ranks``): a rank's own
        ``device``, else the cluster's. A cluster device of plain ``cuda`` spreads the ranks over the visible
        GPUs: rank r gets ``cuda:{r % n}`` (so attention rank r and expert rank r share GPU r); with no
        GPU visible it stays ``cuda`` and the service reports the error itself."""
        gpus = visible_gpus() if self.device == "cuda" else 0
        return [rank.device or (f"cuda:{r % gpus}" if gpus else self.device) for r, rank in enumerate(ranks)]

    def metrics_ports(self) -> dict[str, int | None]:
        """The metrics port of each service by its name (``scheduler``, ``attention-R``, ``expert-R``): the
        scheduler's is ``metrics_port``, the ranks' the ports after it (all 0 when it is 0)."""
        names = [
            "scheduler",
            *(f"attention-{r}" for r in range(self.attention)),
            *(f"expert-{r}" for r in range(self.experts)),
        ]
        base = self.metrics_port
        return {name: None if base is None else base and base + i for i, name in enumerate(names)}

    def rank_threads(self) -> int:
        """torch intra-op threads of each rank: oversubscribed OpenMP threads stall every rank on CPU."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // (self.attention + self.experts))


def visible_gpus() -> int:
    """CUDA devices torch sees here (0 without CUDA); torch is imported only when asked."""
    import torch

    return int(torch.cuda.device_count())


def _rank_specs(raw: Any, where: str) -> list[RankSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}.ranks must be a list")
    specs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}.ranks[{i}] must be a mapping")
        unknown = set(entry) - {"port", "device", "dtype", "args"}
        if unknown:
            raise InvalidArgument(f"{where}.ranks[{i}]: unknown keys {sorted(unknown)}")
        specs.append(
            RankSpec(
                port=int(entry.get("port", 0)),
                device=entry.get("device"),
                dtype=entry.get("dtype"),
                extra_args=[str(a) for a in entry.get("args", [])],
            )
        )
    return specs


_TOP_LEVEL_VALUES = (
    "model",
    "mode",
    "dtype",
    "device",
    "host",
    "threads",
    "compute",
    "trace",
    "optimizations",
    "min_batch_tokens",
    "max_batch_tokens",
    "max_inflight",
    "http_port",
    "metrics_port",
    "tls",
    "auth_token_file",
    "data_plane",
    "route_skew",
)
"""Top-level YAML keys that map one-to-one onto a ``ClusterSpec`` field: the one list both the key check
and the reading use, so a field that is read cannot be rejected as unknown."""
_SECTIONS = ("scheduler", "attention", "experts")
"""Top-level YAML keys that hold a mapping of their own."""


def _int(value: Any, key: str, path: str | Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"cluster spec {path}: {key} must be an integer, got {value!r}")
    return value


def _number(value: Any, key: str, path: str | Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"cluster spec {path}: {key} must be a number, got {value!r}")
    return float(value)


def load_cluster_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterSpec:
    """Read a YAML cluster spec; ``overrides`` (flags that were given) win over the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read cluster spec {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"cluster spec {path} must be a mapping")
    known = {*_TOP_LEVEL_VALUES, *_SECTIONS, "mps"}
    unknown = set(raw) - known
    if unknown:
        raise InvalidArgument(f"cluster spec {path}: unknown keys {sorted(unknown)}")
    scheduler = raw.get("scheduler") or {}
    attention = raw.get("attention") or {}
    experts = raw.get("experts") or {}
    values: dict[str, Any] = {key: raw[key] for key in _TOP_LEVEL_VALUES if raw.get(key) is not None}
    for key in ("min_batch_tokens", "max_batch_tokens", "max_inflight", "metrics_port"):
        if key in values:
            values[key] = _int(values[key], key, path)
    if "route_skew" in values:
        values["route_skew"] = _number(values["route_skew"], "route_skew", path)
    if raw.get("mps") is not None:  # YAML 1.1 reads a bare on/off as a boolean
        mps = raw["mps"]
        values["mps"] = ("on" if mps else "off") if isinstance(mps, bool) else str(mps)
    if "port" in scheduler:
        values["port"] = int(scheduler["port"])
    values["scheduler_args"] = [str(a) for a in scheduler.get("args", [])]
    if "count" in attention:
        values["attention"] = int(attention["count"])
    if "count" in experts:
        values["experts"] = int(experts["count"])
    values["attention_ranks"] = _rank_specs(attention.get("ranks"), "attention")
    values["expert_ranks"] = _rank_specs(experts.get("ranks"), "experts")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.setdefault("attention", len(values["attention_ranks"]) or 2)
    values.setdefault("experts", len(values["expert_ranks"]) or 2)
    return ClusterSpec(**values)


@dataclass(slots=True)
class ServiceCommand:
    name: str
    argv: list[str]


def _metrics_args(spec: ClusterSpec, name: str) -> list[str]:
    port = spec.metrics_ports()[name]
    return [] if port is None else ["--metrics-port", str(port)]


def tls_args(spec: ClusterSpec, role: str) -> list[str]:
    """``--tls-cert/--tls-key/--tls-ca`` of ``role``'s certificate in the spec's TLS directory (none
    without TLS)."""
    if spec.tls is None:
        return []
    from asap.rpc.tls import TlsConfig

    tls = TlsConfig.from_dir(os.path.abspath(spec.tls), role)
    return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]


def expert_commands(spec: ClusterSpec, model_dir: str) -> list[ServiceCommand]:
    devices = spec.rank_devices(spec.expert_ranks)
    return [
        ServiceCommand(
            f"expert-{r}",
            [
                "serve", "expert", "--model", model_dir, "--host", spec.host, "--port", str(rank.port),
                "--rank", str(r), "--num-ranks", str(spec.experts),
                "--dtype", rank.dtype or spec.dtype, "--device", devices[r],
                "--threads", str(spec.rank_threads()), "--compute", spec.compute,
                "--optimizations", spec.optimizations, *_metrics_args(spec, f"expert-{r}"),
                *tls_args(spec, "expert"), *spec.data_plane_args(), *rank.extra_args,
            ],
        )
        for r, rank in enumerate(spec.expert_ranks)
    ]  # fmt: skip


def attention_commands(
    spec: ClusterSpec, model_dir: str, expert_targets: Sequence[str]
) -> list[ServiceCommand]:
    devices = spec.rank_devices(spec.attention_ranks)
    return [
        ServiceCommand(
            f"attention-{r}",
            [
                "serve", "attention", "--model", model_dir, "--host", spec.host, "--port", str(rank.port),
                "--rank", str(r), "--experts", ",".join(expert_targets),
                "--dtype", rank.dtype or spec.dtype, "--device", devices[r],
                "--threads", str(spec.rank_threads()), "--compute", spec.compute,
                "--optimizations", spec.optimizations, *_metrics_args(spec, f"attention-{r}"),
                *tls_args(spec, "attention"), *spec.data_plane_args(), *spec.route_skew_args(),
                *spec.max_inflight_args(),
                *rank.extra_args,
            ],
        )
        for r, rank in enumerate(spec.attention_ranks)
    ]  # fmt: skip


def _max_batch_args(tokens: int | None) -> list[str]:
    return [] if tokens is None else ["--max-batch-tokens", str(tokens)]


def scheduler_command(spec: ClusterSpec, model_dir: str, attention_targets: Sequence[str]) -> ServiceCommand:
    http: list[str] = []
    if spec.http_port is not None:
        # The name of spec.model ("tiny"), not of the directory it resolved to.
        http = ["--http-port", str(spec.http_port), "--served-model-name", served_model_name(spec.model)]
    return ServiceCommand(
        "scheduler",
        [
            "serve", "scheduler", "--model", model_dir, "--host", spec.host, "--port", str(spec.port),
            "--attention", ",".join(attention_targets), "--mode", spec.mode,
            "--optimizations", spec.optimizations, "--min-batch-tokens", str(spec.min_batch_tokens or 0),
            *_max_batch_args(spec.scheduler_max_batch_tokens()), *spec.max_inflight_args(),
            *http, *_metrics_args(spec, "scheduler"), *tls_args(spec, "scheduler"),
            *(["--auth-token-file", os.path.abspath(spec.auth_token_file)] if spec.auth_token_file else []),
            *spec.scheduler_args,
        ],
    )  # fmt: skip
