"""Opening a channel to a peer: the one place every outbound gRPC channel of ASAP is made.

Scheduler -> attention, attention -> expert, the health checks and the client SDK all call these, so a
process with a ``TlsConfig`` presents its certificate on every channel it opens, and one without opens
plaintext ones. (Servers are made in one place too: ``asap.rpc.server.create_server``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from asap.rpc.server import GRPC_OPTIONS
from asap.rpc.tls import TlsConfig

__all__ = ["aio_channel", "blocking_channel"]

ChannelOptions = Sequence[tuple[str, int | str]]


def aio_channel(
    target: str, tls: TlsConfig | None = None, options: ChannelOptions = GRPC_OPTIONS
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: mutual TLS with ``tls``, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(options))


def blocking_channel(target: str, tls: TlsConfig | None = None, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to ``target`` (health checks from scripts and launchers), as ``aio_channel``."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials(), options=list(options))
