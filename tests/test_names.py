"""The one definition of the model dtype names, the serving modes and the sampling-option limits."""

from __future__ import annotations

import math

import pytest
import torch

from asap.dtypes import DTYPES, check_dtype_name, dtype_bytes, torch_dtype
from asap.errors import InvalidArgument
from asap.modes import CHUNKED_MODE, MODES, check_mode
from asap.sampling_options import MAX_TOP_LOGPROBS, check_sampling


def test_dtype_names_map_to_torch() -> None:
    assert [torch_dtype(name) for name in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    assert [dtype_bytes(torch_dtype(name)) for name in DTYPES] == [4, 2, 2]
    with pytest.raises(InvalidArgument, match="dtype must be one of float32, bfloat16, float16"):
        check_dtype_name("int8")
    with pytest.raises(InvalidArgument, match="unsupported model dtype"):
        dtype_bytes(torch.int64)


def test_modes() -> None:
    assert MODES[0] == "async"
    assert CHUNKED_MODE in MODES
    check_mode("sync")
    with pytest.raises(InvalidArgument, match="mode must be one of async, sync, sync-chunked"):
        check_mode("lockstep")


@pytest.mark.parametrize(
    ("temperature", "top_logprobs", "match"),
    [
        (-0.1, 0, "temperature"),
        (math.nan, 0, "temperature"),
        (math.inf, 0, "temperature"),
        (0.0, -1, "top_logprobs"),
        (0.0, MAX_TOP_LOGPROBS + 1, "top_logprobs"),
    ],
)
def test_bad_sampling_options(temperature: float, top_logprobs: int, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        check_sampling(temperature, top_logprobs)
