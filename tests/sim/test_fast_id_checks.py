"""The one-pass check of int32 routing tables (what the planes deliver) against the general path.

``EmulatedExpertPart``'s checked counts take a shortcut for CPU int32 ids; the same ids as int64 take
the general path. Both must accept, count and reject alike, with the same messages, and agree with the
expert executor's own validation (which the chunk passes first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asap.emulation.parts import EmulatedExpertPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, load_config
from expert_svc.core import ExpertExecutor

H200 = load_profile("h200")


@pytest.fixture()
def config_only(qwen3_dir: Path) -> ModelConfig:
    return load_config(qwen3_dir)


def _tables(config: ModelConfig, hosted: list[int]) -> list[torch.Tensor]:
    """Routing tables [N, K]: valid ones (hosted ids and -1 slots), foreign ids, out-of-range ids."""
    gen = np.random.default_rng(7)
    e, k = config.num_experts, config.top_k
    tables = []
    for rows in (1, 3, 17, 64):
        valid = gen.choice(np.array([*hosted, -1]), size=(rows, k))
        tables.append(valid)
        no_skip = gen.choice(np.array(hosted), size=(rows, k))
        tables.append(no_skip)
        foreign = valid.copy()
        foreign[gen.integers(rows), gen.integers(k)] = next(i for i in range(e) if i not in hosted)
        tables.append(foreign)
        for bad in (-2, e, e + 5, np.iinfo(np.int32).max, np.iinfo(np.int32).min):
            out = valid.copy()
            out[gen.integers(rows), gen.integers(k)] = bad
            tables.append(out)
    tables.append(np.full((4, k), -1))
    return [torch.from_numpy(t.astype(np.int64)) for t in tables]


def _outcome(fn: object, *args: object) -> tuple[str, object]:
    try:
        result = fn(*args)  # type: ignore[operator]
    except InvalidArgument as exc:
        return ("error", str(exc))
    return ("ok", None if result is None else np.asarray(result).tolist())


def test_int32_shortcuts_agree_with_the_general_checks(config_only: ModelConfig) -> None:
    hosted = [1, 3, 4]
    part = EmulatedExpertPart(config_only, hosted, H200)
    executor = ExpertExecutor(part)
    layer = config_only.moe_layer_ids[0]
    h = config_only.hidden_size
    seen = set()
    for ids in _tables(config_only, hosted):
        hidden = torch.empty((ids.shape[0], h), device="meta")
        weights = torch.ones(ids.shape, dtype=torch.float32)
        narrow = ids.to(torch.int32)
        general = _outcome(executor.validate, layer, ids)
        assert _outcome(executor.validate, layer, narrow) == general
        counted = _outcome(part._checked_counts, hidden, ids, weights)
        assert _outcome(part._checked_counts, hidden, narrow, weights) == counted
        seen.add((general[0], counted[0]))
    assert seen == {("ok", "ok"), ("error", "error")}


def test_an_empty_table_passes_both(config_only: ModelConfig) -> None:
    part = EmulatedExpertPart(config_only, [0], H200)
    ids = torch.zeros((0, config_only.top_k), dtype=torch.int32)
    ExpertExecutor(part).validate(config_only.moe_layer_ids[0], ids)
    hidden = torch.empty((0, config_only.hidden_size), device="meta")
    counts = part._checked_counts(hidden, ids, torch.zeros(ids.shape))
    assert counts.tolist() == [0]
    with pytest.raises(InvalidArgument):
        ExpertExecutor(part).validate(config_only.num_layers, ids)


@pytest.mark.parametrize("hosted", [[0, 1, 2, 3], [4, 5, 6], [1, 3, 4], [0], [127]])
def test_totals_and_validation_agree_for_blocks_and_scattered_sets(
    config_only: ModelConfig, hosted: list[int]
) -> None:
    """``HostedIds``' two reductions (contiguous blocks) against the full checks: same outcome, same
    message, and the modelled call's two totals equal to those of the full counts."""
    hosted = [e for e in hosted if e < config_only.num_experts] or [0]
    part = EmulatedExpertPart(config_only, hosted, H200)
    executor = ExpertExecutor(part)
    layer = config_only.moe_layer_ids[0]
    h = config_only.hidden_size
    for ids in _tables(config_only, hosted):
        hidden = torch.empty((ids.shape[0], h), device="meta")
        weights = torch.ones(ids.shape, dtype=torch.float32)
        narrow = ids.to(torch.int32)
        assert _outcome(executor.validate, layer, narrow) == _outcome(executor.validate, layer, ids)
        general = _outcome(part._checked_counts, hidden, ids, weights)
        totals = _outcome(part._checked_totals, hidden, narrow, weights)
        if general[0] == "error":
            assert totals == general
        else:
            counts = np.asarray(general[1])
            assert totals == ("ok", [int(counts.sum()), int(np.count_nonzero(counts))])


def test_hosted_ids_reductions_cover_the_edges() -> None:
    """Ids just outside a block, -1 and the int32 extremes: only -1 and the block pass."""
    from asap.model.hosted import HostedIds

    block = HostedIds([4, 5, 6, 7], 16)
    assert block.contiguous
    for value, ok in [(-1, True), (4, True), (7, True), (3, False), (8, False), (0, False), (-2, False)]:
        assert block.all_hosted(np.array([[value, -1]], dtype=np.int32)) is ok, value
    for extreme in (np.iinfo(np.int32).max, np.iinfo(np.int32).min):
        assert not block.all_hosted(np.array([[extreme]], dtype=np.int32))
    assert not block.all_hosted(np.array([[4]], dtype=np.int64))  # int64: the full check decides
    assert block.all_hosted(np.zeros((0, 2), dtype=np.int32))
    assert block.totals(np.array([[4, -1], [4, 6], [-1, -1]], dtype=np.int32)) == (3, 2)
    assert block.totals(np.full((2, 2), -1, dtype=np.int32)) == (0, 0)
    assert not HostedIds([1, 3], 16).contiguous
    assert not HostedIds([1, 3], 16).all_hosted(np.array([[1]], dtype=np.int32))


@pytest.mark.parametrize("hosted", [[0, 1, 2, 3], [4, 5, 6], [1, 3, 4], [0], [127]])
def test_the_executors_counts_are_the_parts_counts(config_only: ModelConfig, hosted: list[int]) -> None:
    """``ExpertExecutor.check`` (the one check of a dispatch's ids): passes and fails as ``validate``
    does, and when it counts, its experts with rows and used slots are the full counts'; the
    part computing with them (``compute_counted``) charges the time ``compute`` charges."""
    from asap.sim.devices import ChargeSleeper

    hosted = [e for e in hosted if e < config_only.num_experts] or [0]
    sleeper = ChargeSleeper()
    part = EmulatedExpertPart(config_only, hosted, H200, sleeper=sleeper)
    executor = ExpertExecutor(part)
    layer = config_only.moe_layer_ids[0]
    h = config_only.hidden_size
    counted_some = False
    for ids in _tables(config_only, hosted):
        hidden = torch.empty((ids.shape[0], h), device="meta")
        weights = torch.ones(ids.shape, dtype=torch.float32)
        narrow = ids.to(torch.int32)
        validated = _outcome(executor.validate, layer, ids)
        checked = _outcome(lambda *args: executor.check(*args) and None, layer, narrow)
        assert checked[0] == validated[0]
        if checked[0] == "error":
            assert checked == validated
            continue
        counted = executor.check(layer, narrow)
        if len(hosted) != max(hosted) - min(hosted) + 1:
            assert counted is None  # a scattered set: the full check, no counts
            continue
        assert counted is not None
        counts = part._checked_counts(hidden, ids, weights)  # in ``hosted`` order: a sorted block here
        per_expert, used = counted
        assert (per_expert > 0).tolist() == (counts > 0).tolist() and used == int(counts.sum())
        part.compute(layer, hidden, narrow, weights)
        full = sleeper.take()
        part.compute_counted(layer, hidden, narrow, weights, counted)
        assert sleeper.take() == full
        counted_some = True
    assert counted_some == (len(hosted) == max(hosted) - min(hosted) + 1)


def test_hosted_counts_cover_the_edges_and_add_up() -> None:
    """``HostedIds.counts``: ids just outside a block, -1 and the int32 extremes (only -1 and the block
    pass), an empty table, and the counts of stacked tables (a merged call) as their sum."""
    from asap.model.hosted import HostedIds, add_counts

    block = HostedIds([4, 5, 6, 7], 16)
    for value, ok in [(-1, True), (4, True), (7, True), (3, False), (8, False), (0, False), (-2, False)]:
        assert (block.counts(np.array([[value, -1]], dtype=np.int32)) is not None) is ok, value
    for extreme in (np.iinfo(np.int32).max, np.iinfo(np.int32).min):
        assert block.counts(np.array([[extreme]], dtype=np.int32)) is None
    assert block.counts(np.array([[4]], dtype=np.int64)) is None  # int64: the full check decides
    empty = block.counts(np.zeros((0, 2), dtype=np.int32))
    assert empty is not None and empty[0].tolist() == [0, 0, 0, 0] and empty[1] == 0
    first = block.counts(np.array([[4, -1], [4, 6]], dtype=np.int32))
    second = block.counts(np.array([[-1, -1], [7, 6]], dtype=np.int32))
    assert first is not None and first[0].tolist() == [2, 0, 1, 0] and first[1] == 3
    merged = add_counts([first, second])
    assert merged is not None and merged[0].tolist() == [2, 0, 2, 1] and merged[1] == 5
    assert add_counts([first, None]) is None
    assert HostedIds([0, 1], 4).counts(np.array([[0, 1, -1]], dtype=np.int32)) is not None  # low 0


def test_long_tables_are_checked_to_their_last_slot() -> None:
    """A table longer than the counted head (``HostedIds._counts_large``): a bad id or an expert's only
    rows after the head are seen; the used slots and experts with rows are those of the full count."""
    from asap.model.hosted import _HEAD, HostedIds

    block = HostedIds(list(range(32, 48)), 64)
    gen = np.random.default_rng(3)
    rows = 4 * _HEAD // 8 + 5
    ids = np.full((rows, 8), -1, dtype=np.int32)
    mask = gen.random(ids.shape) < 0.2
    mask[-1, -1] = False
    ids[mask] = gen.integers(32, 47, int(mask.sum()))  # expert 47 never in the head
    full = np.bincount(ids[ids >= 0] - 32, minlength=16)
    counted = block.counts(ids)
    assert counted is not None and (counted[0] > 0).tolist() == (full > 0).tolist()
    assert counted[1] == int(mask.sum()) and not counted[0][15]
    ids[-1, -1] = 47  # the cold expert's only row, at the end
    counted = block.counts(ids)
    assert counted is not None and counted[0][15] == 1 and counted[1] == int(mask.sum()) + 1
    for bad in (31, 48, -2, 0, np.iinfo(np.int32).max, np.iinfo(np.int32).min):
        wrong = ids.copy()
        wrong[-1, 0] = bad
        assert block.counts(wrong) is None, bad
        assert not block.all_hosted(wrong)
