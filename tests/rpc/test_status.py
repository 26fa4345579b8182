"""In-band errors (``asap.v1.Error``) and gRPC status codes: the one translation, both directions."""

from __future__ import annotations

import grpc
import pytest

from asap.errors import (
    AsapError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from asap.rpc.status import error_from_wire, error_to_wire, status_code_of, wire_error
from asap.v1 import common_pb2


@pytest.mark.parametrize(
    "exc",
    [InvalidArgument("bad"), ResourceExhausted("full"), Unavailable("down"), DeadlineExceeded("late")],
)
def test_an_error_survives_the_wire(exc: AsapError) -> None:
    wire = common_pb2.Error.FromString(error_to_wire(exc).SerializeToString())
    assert wire.code == exc.code == status_code_of(exc).name
    back = error_from_wire(wire)
    assert type(back) is type(exc)
    assert back.message == exc.message


def test_an_unknown_code_is_kept_on_the_wire_and_read_as_internal() -> None:
    wire = wire_error("NO_SUCH_CODE", "odd")
    assert wire.code == "NO_SUCH_CODE"
    back = error_from_wire(wire)
    assert type(back) is InternalError
    assert back.message == "odd"


def test_where_prefixes_the_message_with_the_code() -> None:
    back = error_from_wire(wire_error("UNAVAILABLE", "gone"), "layer 3")
    assert type(back) is Unavailable
    assert back.message == "layer 3: UNAVAILABLE: gone"
    assert status_code_of(back) is grpc.StatusCode.UNAVAILABLE
