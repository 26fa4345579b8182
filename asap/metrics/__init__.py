"""What the services count and time, for Prometheus: pure recorders here, the exporter in ``export``.

The cores update these recorders on their own paths (plain integer and float updates, no lock, no
prometheus import); each service's ``metrics`` module reads them, and the cores' existing state, when
Prometheus scrapes (custom collectors, ``asap.metrics.export``). Metrics off costs the same as metrics
on, apart from the scrapes themselves.

Names: an ``asap_`` prefix, base units (seconds), ``_total`` on counters; where vLLM exports the same
quantity the name mirrors vLLM's (``asap_time_to_first_token_seconds`` ~ ``vllm:time_to_first_token_seconds``).
The README's metrics section lists every metric.
"""

from asap.metrics.recorders import (
    EXCHANGE_BUCKETS_S,
    PREFILL_BUCKETS_S,
    TOKEN_BUCKETS,
    BusyClock,
    Distribution,
    DistributionSnapshot,
)

__all__ = [
    "EXCHANGE_BUCKETS_S",
    "PREFILL_BUCKETS_S",
    "TOKEN_BUCKETS",
    "BusyClock",
    "Distribution",
    "DistributionSnapshot",
]
