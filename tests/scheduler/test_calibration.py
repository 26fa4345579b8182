"""calibrate_cost_model against a fake rank client: the probes it sends, the fit, the fallbacks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from asap.errors import AsapError, InternalError, Unavailable
from asap.model.config import ModelConfig, load_config
from asap.syncstep import SyncStep
from scheduler_svc.calibration import CALIBRATION_BATCH_IDS, CALIBRATION_LENGTHS, calibrate_cost_model
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.requests import RankResultItem, ScheduledRequest


@dataclass
class ProbeClient:
    """Answers every probe, or fails the ``fail_at``-th one (raising ``raises``, or answering ``answers``)."""

    fail_at: int | None = None
    raises: AsapError | None = None
    answers: AsapError | None = None
    probes: list[tuple[int, int, int]] = field(default_factory=list)
    """(rank, batch id, prompt tokens) per call."""

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> list[RankResultItem | AsapError | None]:
        assert sync is None and chunks is None
        self.probes.append((rank, batch_id, requests[0].prompt_tokens))
        if self.fail_at is not None and len(self.probes) > self.fail_at:
            if self.raises is not None:
                raise self.raises
            assert self.answers is not None
            return [self.answers]
        return [RankResultItem(0, -1.0, [], r.prompt_tokens) for r in requests]


@pytest.fixture
def config(qwen3_dir: Path) -> ModelConfig:
    return load_config(qwen3_dir)


async def test_probes_go_to_rank_0_with_ids_above_the_cores_and_the_fit_is_valid(config: ModelConfig) -> None:
    client = ProbeClient()
    cost = await calibrate_cost_model(client, config, repeats=2)
    lengths = sorted({min(n, config.max_position_embeddings) for n in CALIBRATION_LENGTHS})
    warmup = [n for n in lengths if n <= 1024]
    assert [n for _, _, n in client.probes] == warmup + lengths + lengths
    assert {rank for rank, _, _ in client.probes} == {0}
    assert all(batch_id >= CALIBRATION_BATCH_IDS for _, batch_id, _ in client.probes)
    assert len({batch_id for _, batch_id, _ in client.probes}) == len(client.probes)
    assert isinstance(cost, AttentionCostModel)


async def test_a_lost_rank_is_reported_down_and_the_defaults_are_used(config: ModelConfig) -> None:
    downs: list[tuple[int, str]] = []
    client = ProbeClient(fail_at=1, raises=Unavailable("attention rank 0 at x: gone"))
    cost = await calibrate_cost_model(client, config, on_rank_down=lambda r, why: downs.append((r, why)))
    assert cost == AttentionCostModel()
    assert downs == [(0, "attention rank 0 at x: gone")]


async def test_a_failed_probe_falls_back_without_marking_the_rank_down(config: ModelConfig) -> None:
    downs: list[tuple[int, str]] = []
    client = ProbeClient(fail_at=0, answers=InternalError("probe failed"))
    cost = await calibrate_cost_model(client, config, on_rank_down=lambda r, why: downs.append((r, why)))
    assert cost == AttentionCostModel()
    assert downs == [] and len(client.probes) == 1
