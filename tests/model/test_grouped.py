"""The layer-agnostic grouped routine: one code path for every layer, equal to the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from asap.model import grouped
from asap.model.config import parse_config
from asap.model.expert_part import ExpertPart
from asap.model.grouped import LayerAgnosticExperts, bucket_for


def _part(layers: int = 5, experts: int = 6, hidden: int = 16, inter: int = 8) -> ExpertPart:
    config = parse_config(
        {
            "model_type": "mixtral", "vocab_size": 32, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": experts,
            "num_experts_per_tok": 2, "intermediate_size": inter,
        }
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    return ExpertPart(
        config,
        range(experts),
        gate_up=torch.randn(layers, experts, 2 * inter, hidden, generator=g),
        down=torch.randn(layers, experts, hidden, inter, generator=g),
    )


@pytest.mark.parametrize("max_groups", [1023, 13, 6])
def test_every_layer_matches_the_per_expert_loop(monkeypatch: pytest.MonkeyPatch, max_groups: int) -> None:
    """Windows of whole layers (small max_groups forces several) give the same results."""
    monkeypatch.setattr(grouped, "MAX_GROUPS", max_groups)
    part = _part()
    routine = LayerAgnosticExperts(part.gate_up, part.down, fused=False)
    assert len(routine.windows) == -(-5 // max(1, max_groups // 6))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 16, generator=g)
    ids = torch.randint(-1, 6, (9, 2), generator=g)
    ids[0] = -1  # a token with no slot here
    weights = torch.rand(9, 2, generator=g)
    for layer in range(5):
        expected = part.compute(layer, hidden, ids, weights)
        got = routine(layer, hidden, ids, weights)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[0], torch.zeros(16))


def test_buckets_cover_any_size() -> None:
    assert [bucket_for(n) for n in (1, 16, 17, 1000, 32768)] == [16, 16, 32, 1024, 32768]
    assert bucket_for(40000) == 65536 and bucket_for(40000) >= 40000
