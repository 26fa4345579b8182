"""Wire format: tensor codec and the dispatch/combine chunks of ``Expert.Exchange`` (docs/architecture.md §6)."""

from asap.wire.chunks import (
    HEADER_ALLOWANCE,
    MAX_CHUNK_BYTES,
    CombineAssembler,
    Dispatch,
    combine_chunk,
    decode_dispatch,
    dispatch_chunks,
    error_combine,
)
from asap.wire.codec import SUPPORTED_DTYPES, decode_tensor, dtype_from_proto, dtype_to_proto, encode_tensor

__all__ = [
    "HEADER_ALLOWANCE",
    "MAX_CHUNK_BYTES",
    "SUPPORTED_DTYPES",
    "CombineAssembler",
    "Dispatch",
    "combine_chunk",
    "decode_dispatch",
    "decode_tensor",
    "dispatch_chunks",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode_tensor",
    "error_combine",
]
