"""The one place where ASAP errors and gRPC status codes are translated into each other.

Both directions, for the two ways an error travels: as the status of a failed RPC (``abort_with``,
``error_from_rpc``) and in band, as an ``asap.v1.Error`` inside a message of a stream that keeps going
(``error_to_wire``, ``error_from_wire``). The in-band ``code`` is a gRPC status code name.
"""

from __future__ import annotations

import grpc

from asap.errors import ERRORS_BY_CODE, AsapError, InternalError
from asap.v1 import common_pb2

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


def error_to_wire(exc: AsapError) -> common_pb2.Error:
    """The in-band form of ``exc``: its status code name and message."""
    return wire_error(exc.code, exc.message)


def wire_error(code: str, message: str) -> common_pb2.Error:
    """An in-band error from a status code name (kept as given, even one grpc does not know) and a message."""
    return common_pb2.Error(code=code, message=message)


def error_from_wire(error: common_pb2.Error, where: str = "") -> AsapError:
    """The ASAP error an in-band error stands for (INTERNAL for an unknown code). With ``where``, the
    message says where it came from: ``"{where}: {code}: {message}"``."""
    message = f"{where}: {error.code}: {error.message}" if where else error.message
    return error_from_status(error.code, message)
