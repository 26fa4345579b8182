import pytest

from asap.errors import InvalidArgument
from asap.syncstep import SyncStep


def test_wire_round_trip() -> None:
    step = SyncStep(7, 3)
    assert SyncStep.to_wire(step) == (7, 3)
    assert SyncStep.from_wire(*SyncStep.to_wire(step)) == step


def test_async_is_none_on_both_sides() -> None:
    assert SyncStep.from_wire(0, 0) is None
    assert SyncStep.from_wire(5, 0) is None
    assert SyncStep.to_wire(None) == (0, 0)


@pytest.mark.parametrize(("step", "participants"), [(-1, 1), (0, 0), (3, -2)])
def test_invalid_steps_are_rejected(step: int, participants: int) -> None:
    with pytest.raises(InvalidArgument):
        SyncStep(step, participants)
