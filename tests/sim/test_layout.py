"""Which devices the ranks of a simulated cluster occupy."""

from __future__ import annotations

import pytest

from asap.errors import InvalidArgument
from asap.sim.cluster import Layout


def test_disaggregated_gives_every_rank_its_own_devices() -> None:
    attention, experts = Layout("disaggregated", attention_tp=4).devices(4, 16)
    assert [len(group) for group in attention] == [4] * 4 and [len(group) for group in experts] == [1] * 16
    names = [d.name for group in (*attention, *experts) for d in group]
    assert len(set(names)) == 32 == Layout("disaggregated", 4).device_count(4, 16)


def test_colocated_puts_the_experts_on_the_attention_devices() -> None:
    attention, experts = Layout("colocated", attention_tp=4).devices(8, 32)
    shared = [d for group in attention for d in group]
    assert len(shared) == 32 == Layout("colocated", 4).device_count(8, 32)
    assert [group[0] for group in experts] == shared  # expert rank e on device e
    _, fewer = Layout("colocated").devices(4, 2)
    assert fewer[0][0] is not fewer[1][0]  # spread out, not stacked on the first devices
    _, more = Layout("colocated").devices(2, 4)
    assert more[0][0] is more[2][0] and more[1][0] is more[3][0]


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        Layout("mixed")
    with pytest.raises(InvalidArgument):
        Layout(attention_tp=0)
