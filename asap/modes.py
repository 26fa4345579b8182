"""The serving modes of a cluster: how the scheduler paces the attention ranks' batches.

``async``: each attention rank runs its own batches as they come; ``sync``: every rank takes part in one
global step at a time; ``sync-chunked``: as ``sync``, with long prompts prefilled in chunks.
"""

from __future__ import annotations

from asap.errors import InvalidArgument

MODES = ("async", "sync", "sync-chunked")
"""Mode names, in ``--mode`` order (the first is the default)."""
CHUNKED_MODE = "sync-chunked"
"""The mode that prefills long prompts in chunks of ``chunk_tokens``."""


def check_mode(mode: str) -> None:
    """Raise ``InvalidArgument`` unless ``mode`` is one of ``MODES``."""
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
