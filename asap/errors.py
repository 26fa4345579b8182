"""The ASAP exception hierarchy.

Every error raised on purpose by ASAP code is an ``AsapError``; each class carries the name of the gRPC
status code it maps to, so services translate errors to statuses in one place (``asap.rpc.status``) and
the client SDK translates statuses back into the same classes.

    AsapError
    ├── InvalidArgument            INVALID_ARGUMENT   bad prompt, malformed tensor, bad config value
    │   ├── UnsupportedArchitecture                   checkpoint model_type ASAP does not implement
    │   └── CheckpointError                           missing tensor, shape/dtype mismatch in a checkpoint
    ├── ResourceExhausted          RESOURCE_EXHAUSTED admission refused (queue bound reached)
    ├── Unavailable                UNAVAILABLE        a needed service or peer stream is down
    ├── DeadlineExceeded           DEADLINE_EXCEEDED  the request's deadline passed
    ├── RequestCancelled           CANCELLED          the client went away
    ├── Unauthenticated            UNAUTHENTICATED    no accepted bearer token (the public endpoint)
    └── InternalError              INTERNAL           a bug: a service invariant broke
"""

from __future__ import annotations


class AsapError(Exception):
    """Base class of all ASAP errors. ``code`` is the gRPC status code name it maps to."""

    code: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AsapError):
    """The request or input is malformed; retrying it unchanged fails again."""

    code = "INVALID_ARGUMENT"


class UnsupportedArchitecture(InvalidArgument):
    """The checkpoint's ``model_type`` is not one ASAP implements."""

    def __init__(self, model_type: str, supported: tuple[str, ...]) -> None:
        super().__init__(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(supported))}")
        self.model_type = model_type


class CheckpointError(InvalidArgument):
    """A checkpoint is missing a tensor or holds one of the wrong shape."""


class ResourceExhausted(AsapError):
    """Admission refused: a queue bound was reached. Safe to retry later."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(AsapError):
    """A needed service or peer is down. Safe to retry when the request was not started."""

    code = "UNAVAILABLE"


class DeadlineExceeded(AsapError):
    """The request's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class RequestCancelled(AsapError):
    """The request was cancelled by its client."""

    code = "CANCELLED"


class Unauthenticated(AsapError):
    """The call carried no accepted credentials; the refusal says nothing more, on purpose."""

    code = "UNAUTHENTICATED"


class InternalError(AsapError):
    """An invariant of a service broke; this is a bug."""

    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[AsapError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        RequestCancelled,
        Unauthenticated,
        InternalError,
    )
}
