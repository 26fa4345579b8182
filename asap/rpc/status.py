"""The one place where ASAP errors and gRPC status codes are translated into each other."""

from __future__ import annotations

import grpc

from asap.errors import ERRORS_BY_CODE, AsapError, InternalError

_STATUS_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def status_code_of(exc: AsapError) -> grpc.StatusCode:
    """The gRPC status code an ASAP error maps to (UNKNOWN for codes grpc does not know)."""
    return _STATUS_BY_NAME.get(exc.code, grpc.StatusCode.UNKNOWN)


def error_from_status(code: grpc.StatusCode | str, message: str) -> AsapError:
    """The ASAP error class for a gRPC status code (or its name); INTERNAL for anything unmapped."""
    name = code if isinstance(code, str) else code.name
    cls = ERRORS_BY_CODE.get(name, InternalError)
    return cls(message)


def error_from_rpc(exc: grpc.RpcError) -> AsapError:
    """Translate a grpc error raised by a call into the matching ASAP error."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_from_status(code, details or str(code))


async def abort_with(context: grpc.aio.ServicerContext, exc: AsapError) -> None:
    """Abort the RPC with the status code mapped from ``exc`` (raises, never returns)."""
    await context.abort(status_code_of(exc), exc.message)
