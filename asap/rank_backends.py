"""Validation of the two backend choices every rank's configuration takes: ``compute`` and ``data_plane``.

Attention and expert ranks accept the same values for both, so they check them in one place and refuse
them with the same messages.
"""

from __future__ import annotations

from asap.dataplane.select import DATA_PLANES
from asap.errors import InvalidArgument


def check_rank_backends(compute: str, data_plane: str) -> None:
    """``InvalidArgument`` unless ``compute`` is ``torch``/``emulated:DEVICE`` and ``data_plane`` is known.

    The device name of ``emulated:`` is looked up when the rank builds its backend, not here."""
    if not (compute == "torch" or compute.startswith("emulated:")):
        raise InvalidArgument(f"compute must be 'torch' or 'emulated:DEVICE', got {compute!r}")
    if data_plane not in DATA_PLANES:
        raise InvalidArgument(f"data_plane must be one of {', '.join(DATA_PLANES)}, got {data_plane!r}")
