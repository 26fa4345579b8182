"""The ASAP client SDK.

    async with AsapClient("localhost:50051") as client:
        result = await client.prefill(tokens=[1, 2, 3], top_logprobs=5)
        results = await client.prefill_many([{"text": "hello"}, {"tokens": [4, 5]}])

    with AsapClient.connect_sync("localhost:50051") as client:   # blocking, for scripts
        result = client.prefill(text="hello")

Every failure is an ``AsapError`` (re-exported here from ``asap.errors``), never a bare
``grpc.RpcError``; the gRPC status code of the call picks the class:

    AsapError
    ├── InvalidArgument      INVALID_ARGUMENT   empty prompt, token id outside the vocabulary, too long;
    │                                           also raised before sending for input the client rejects
    ├── ResourceExhausted    RESOURCE_EXHAUSTED admission refused (retried first, see ``retries``)
    ├── Unavailable          UNAVAILABLE        scheduler unreachable or a service down (retried first)
    ├── DeadlineExceeded     DEADLINE_EXCEEDED  the call's ``timeout_s`` passed (never retried)
    ├── RequestCancelled     CANCELLED
    ├── Unauthenticated      UNAUTHENTICATED    no accepted ``token`` (never retried)
    └── InternalError        INTERNAL (and any unmapped code)

Mutual TLS and tokens: ``AsapClient(target, tls=TlsConfig.from_dir(DIR), token=TOKEN)``; ``DIR`` is what
``asap up --tls DIR`` made (its ``client/`` certificate) or a directory holding tls.crt, tls.key, ca.crt.

Using a closed client raises ``RuntimeError`` (a programming error, not a request failure).
"""

from asap.client._client import DEFAULT_TARGET, AsapClient
from asap.client._sync import SyncAsapClient
from asap.client._types import (
    AttentionRankState,
    ClientState,
    ClusterState,
    PrefillRequestSpec,
    PrefillResult,
)
from asap.errors import (
    AsapError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    RequestCancelled,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from asap.rpc.tls import TlsConfig

__all__ = [
    "DEFAULT_TARGET",
    "AsapClient",
    "AsapError",
    "AttentionRankState",
    "ClientState",
    "ClusterState",
    "DeadlineExceeded",
    "InternalError",
    "InvalidArgument",
    "PrefillRequestSpec",
    "PrefillResult",
    "RequestCancelled",
    "ResourceExhausted",
    "SyncAsapClient",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
]
