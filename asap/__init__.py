"""ASAP: asynchronous, disaggregated prefill serving for Mixture-of-Experts language models."""

from asap.errors import (
    AsapError,
    CheckpointError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    RequestCancelled,
    ResourceExhausted,
    Unavailable,
    UnsupportedArchitecture,
)

__version__ = "0.1.0"

__all__ = [
    "AsapError",
    "CheckpointError",
    "DeadlineExceeded",
    "InternalError",
    "InvalidArgument",
    "RequestCancelled",
    "ResourceExhausted",
    "Unavailable",
    "UnsupportedArchitecture",
    "__version__",
]
