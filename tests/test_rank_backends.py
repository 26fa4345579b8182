import pytest

from asap.errors import InvalidArgument
from asap.rank_backends import check_rank_backends


@pytest.mark.parametrize("compute", ["torch", "emulated:h200", "emulated:ascend910/4"])
def test_known_backends_pass(compute: str) -> None:
    assert check_rank_backends(compute, "auto") is None


def test_unknown_compute_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="compute must be 'torch' or 'emulated:DEVICE'"):
        check_rank_backends("cuda", "auto")


def test_unknown_data_plane_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="data_plane must be one of"):
        check_rank_backends("torch", "rdma")
