"""Configuration of one attention rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from asap.dataplane.fast import ATTACH_S, DEFAULT_PEER_TIMEOUT_S
from asap.dtypes import check_dtype_name
from asap.errors import InvalidArgument
from asap.rank_backends import check_rank_backends
from asap.rpc.tls import TlsConfig


@dataclass(slots=True)
class AttentionServiceConfig:
    """Everything an attention rank needs to start; built from CLI flags or the cluster spec."""

    model: str = "tiny"
    """Checkpoint directory, or ``tiny`` for the built-in model."""
    rank: int = 0
    expert_targets: list[str] = field(default_factory=list)
    """``host:port`` of every expert rank, in expert-rank order."""
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_inflight_batches: int = 2
    """Micro-batches running concurrently on this rank (their coroutines interleave: while one waits for
    the experts, another computes attention)."""
    max_chunk_bytes: int = 2 * 1024 * 1024
    """Upper bound of one DispatchChunk message; larger dispatches are split by rows."""
    expert_connect_timeout_s: float = 60.0
    """How long start-up waits for every expert rank to answer ``Info``."""
    drain_timeout_s: float = 30.0
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port (0: a free one, printed); None: no metrics server."""
    compute: str = "torch"
    """``torch`` (real math) or ``emulated:DEVICE`` (sleep for the modeled time; no weights, no values)."""
    route_skew: float = 0.0
    """Emulated compute: popularity skew of the random top-k routing (0 = uniform)."""
    data_plane: str = "auto"
    """How activations reach the expert ranks: ``grpc`` (inline bytes), ``shm`` (same-host shared memory,
    CPU only; fails if not possible) or ``auto`` (shm where possible, per expert rank, else grpc)."""
    fast_peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    """Fast plane: an expert rank whose heartbeat is older than this while dispatches wait is taken for
    dead or frozen (its batches fail with UNAVAILABLE); ``asap.dataplane.fast.DEFAULT_PEER_TIMEOUT_S``."""
    fast_attach_timeout_s: float = ATTACH_S
    """Fast plane: how long an announced region may wait for the expert rank to attach
    (``asap.dataplane.fast_attention.ATTACH_S``)."""
    tls: TlsConfig | None = None
    """Mutual TLS on this rank's port and on its channels to the expert ranks; None: plaintext."""

    def __post_init__(self) -> None:
        if not self.expert_targets:
            raise InvalidArgument(
                "an attention rank needs at least one expert target (--experts HOST:PORT,...)"
            )
        for target in self.expert_targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise InvalidArgument(f"expert target {target!r} is not HOST:PORT")
        check_dtype_name(self.dtype)
        if self.max_inflight_batches < 1:
            raise InvalidArgument(f"max_inflight_batches must be >= 1, got {self.max_inflight_batches}")
        if self.max_chunk_bytes < 4096:
            raise InvalidArgument(f"max_chunk_bytes must be >= 4096, got {self.max_chunk_bytes}")
        check_rank_backends(self.compute, self.data_plane)
        if self.route_skew < 0:
            raise InvalidArgument(f"route_skew must be >= 0, got {self.route_skew}")
        if self.fast_peer_timeout_s <= 0 or self.fast_attach_timeout_s <= 0:
            raise InvalidArgument(
                f"fast plane timeouts must be > 0, got {self.fast_peer_timeout_s} s and "
                f"{self.fast_attach_timeout_s} s"
            )
        if self.rank < 0:
            raise InvalidArgument(f"rank must be >= 0, got {self.rank}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
