"""--optimizations parsing and formatting."""

from __future__ import annotations

import itertools

import pytest

from asap.errors import InvalidArgument
from asap.optimizations import OPTIMIZATIONS, format_optimizations, parse_optimizations


def test_all_is_the_default_and_turns_everything_on() -> None:
    assert parse_optimizations() == frozenset(OPTIMIZATIONS)
    assert parse_optimizations("all") == frozenset(OPTIMIZATIONS)
    assert parse_optimizations(" ALL ") == frozenset(OPTIMIZATIONS)


def test_none_turns_everything_off() -> None:
    assert parse_optimizations("none") == frozenset()


def test_comma_list_keeps_the_named_ones() -> None:
    assert parse_optimizations("dual-batch, min-batch,") == {"min-batch", "dual-batch"}
    assert parse_optimizations("layer-agnostic") == {"layer-agnostic"}


@pytest.mark.parametrize(
    ("text", "named"),
    [("min-batch,turbo", "turbo"), ("dualbatch", "dualbatch"), ("all,min-batch", "all"), ("none,x", "none")],
)
def test_unknown_names_are_rejected_with_the_valid_ones(text: str, named: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_optimizations(text)
    assert named in info.value.message
    assert all(name in info.value.message for name in OPTIMIZATIONS)


def test_empty_value_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        parse_optimizations(" , ")


def test_format_is_canonical() -> None:
    assert format_optimizations(set(OPTIMIZATIONS)) == "all"
    assert format_optimizations(set()) == "none"
    assert format_optimizations({"layer-agnostic", "dual-batch"}) == "dual-batch,layer-agnostic"
    with pytest.raises(InvalidArgument, match="bogus"):
        format_optimizations({"bogus"})


def test_every_subset_round_trips() -> None:
    for size in range(len(OPTIMIZATIONS) + 1):
        for subset in itertools.combinations(OPTIMIZATIONS, size):
            assert parse_optimizations(format_optimizations(frozenset(subset))) == frozenset(subset)
