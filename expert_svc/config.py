"""Configuration of one expert rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from asap.dtypes import check_dtype_name
from asap.errors import InvalidArgument
from asap.optimizations import OPTIMIZATIONS
from asap.rank_backends import check_rank_backends
from asap.rpc.tls import TlsConfig


@dataclass(slots=True)
class ExpertServiceConfig:
    """Everything an expert rank needs to start; built from CLI flags or the cluster spec."""

    model: str = "tiny"
    """Checkpoint directory, or ``tiny`` for the built-in model."""
    rank: int = 0
    """This rank's index among the expert ranks."""
    num_ranks: int = 1
    """How many expert ranks share the experts (contiguous blocks of expert ids)."""
    host: str = "127.0.0.1"
    port: int = 0
    """Port to listen on; 0 picks a free one (printed at start-up)."""
    dtype: str = "float32"
    device: str = "cpu"
    queue_depth: int = 256
    """Dispatch chunks that may wait for compute (all streams together); a full queue stops reading
    from the streams, so grpc flow control backpressures the attention ranks. Nothing is dropped."""
    max_merge_rows: int = 16384
    """Upper bound on rows of same-layer chunks computed together in one expert call."""
    drain_timeout_s: float = 10.0
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port (0: a free one, printed); None: no metrics server."""
    optimizations: frozenset[str] = field(default_factory=lambda: frozenset(OPTIMIZATIONS))
    """Enabled optimizations; expert ranks act on ``expert-overlap`` (receive, compute and send of
    different chunks proceed concurrently; off: one chunk at a time, end to end) and ``layer-agnostic``
    (one routine over weights stacked for all layers; off: a per-layer module per call)."""
    compute: str = "torch"
    """``torch`` (real math) or ``emulated:DEVICE`` (sleep for the modeled time; no weights, no values)."""
    sync_timeout_s: float = 120.0
    """Sync mode: how long a (step, layer) waits for missing attention ranks before failing."""
    data_plane: str = "auto"
    """``auto``/``shm``: accept hidden rows by reference into same-host shared memory (CPU torch compute
    only; ``shm`` fails otherwise); ``grpc``: inline bytes only (references are INVALID_ARGUMENT)."""
    tls: TlsConfig | None = None
    """Mutual TLS on this rank's port (clients need a certificate from its CA); None: plaintext."""

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise InvalidArgument(f"num_ranks must be >= 1, got {self.num_ranks}")
        if not 0 <= self.rank < self.num_ranks:
            raise InvalidArgument(f"rank {self.rank} is outside [0, {self.num_ranks})")
        check_dtype_name(self.dtype)
        if self.queue_depth < 1:
            raise InvalidArgument(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.max_merge_rows < 1:
            raise InvalidArgument(f"max_merge_rows must be >= 1, got {self.max_merge_rows}")
        check_rank_backends(self.compute, self.data_plane)
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be in [0, 65535], got {self.port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
