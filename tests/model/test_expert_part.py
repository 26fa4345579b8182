"""ExpertPart: stacked layer-agnostic expert compute, partial hosting, validation, lazy reads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from asap.errors import InvalidArgument
from asap.model import names
from asap.model.attention_part import AttentionPart
from asap.model.checkpoint import CheckpointReader
from asap.model.config import ModelConfig, parse_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.weights import DictTensorSource
from tests.model.conftest import TinyModel

HIDDEN, INTER, EXPERTS, K = 16, 8, 5, 3


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    # layers 0, 2, 3 are MoE; layer 1 is dense
    return parse_config(
        dict(
            model_type="qwen3_moe",
            vocab_size=32,
            hidden_size=HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=EXPERTS,
            num_experts_per_tok=K,
            moe_intermediate_size=INTER,
            intermediate_size=24,
            mlp_only_layers=[1],
        )
    )


def _random_source(config: ModelConfig) -> DictTensorSource:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in config.moe_layer_ids:
        for e in range(EXPERTS):
            n = names.expert(config, layer, e)
            tensors[n.gate] = torch.randn(INTER, HIDDEN, generator=g)
            tensors[n.up] = torch.randn(INTER, HIDDEN, generator=g)
            tensors[n.down] = torch.randn(HIDDEN, INTER, generator=g)
    return DictTensorSource(tensors)


@pytest.fixture(scope="module")
def source(config: ModelConfig) -> DictTensorSource:
    return _random_source(config)


def _unstacked(
    source: DictTensorSource,
    cfg: ModelConfig,
    layer: int,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Per-layer, per-expert computation straight from the checkpoint tensors."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist(), strict=True):
            if e < 0:
                continue
            n = names.expert(cfg, layer, e)
            h = F.silu(x[t] @ source.get(n.gate).T) * (x[t] @ source.get(n.up).T)
            out[t] += w * (h @ source.get(n.down).T)
    return out


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, K, generator=g)


def test_one_stacked_routine_serves_every_moe_layer(config: ModelConfig, source: DictTensorSource) -> None:
    part = ExpertPart.from_source(source, config, range(EXPERTS))
    assert part.hosted == tuple(range(EXPERTS))
    assert part.gate_up.shape == (3, EXPERTS, 2 * INTER, HIDDEN)
    assert part.down.shape == (3, EXPERTS, HIDDEN, INTER)
    x, ids, w = _routing(11, seed=1)
    outputs = []
    for layer in config.moe_layer_ids:
        out = part.compute(layer, x, ids, w)
        assert out.dtype == torch.float32 and out.shape == x.shape
        torch.testing.assert_close(out, _unstacked(source, config, layer, x, ids, w), rtol=1e-5, atol=1e-4)
        outputs.append(out)
    assert not torch.allclose(outputs[0], outputs[1])  # the layer index really selects other weights


def test_minus_one_slots_are_skipped(config: ModelConfig, source: DictTensorSource) -> None:
    part = ExpertPart.from_source(source, config, range(EXPERTS))
    x, ids, w = _routing(6, seed=2)
    masked = ids.clone()
    masked[:, 1] = -1
    masked[3] = -1  # a token with no slot at all
    out = part.compute(0, x, masked, w)
    torch.testing.assert_close(out, _unstacked(source, config, 0, x, masked, w), rtol=1e-5, atol=1e-4)
    assert bool((out[3] == 0).all())


def test_partial_parts_sum_to_the_full_part(config: ModelConfig, source: DictTensorSource) -> None:
    full = ExpertPart.from_source(source, config, range(EXPERTS))
    placement = ExpertPlacement(EXPERTS, 2)
    x, ids, w = _routing(10, seed=3)
    total = torch.zeros_like(x)
    for rank in range(2):
        part = ExpertPart.from_source(source, config, placement.experts_of(rank))
        mine = torch.isin(ids, torch.tensor(part.hosted))
        total += part.compute(2, x, torch.where(mine, ids, -1).to(torch.int32), torch.where(mine, w, 0.0))
    torch.testing.assert_close(total, full.compute(2, x, ids, w), rtol=1e-5, atol=1e-5)


def _tensor_names(cfg: ModelConfig, experts: tuple[int, ...]) -> set[str]:
    return {
        name
        for layer in cfg.moe_layer_ids
        for e in experts
        for name in (
            names.expert(cfg, layer, e).gate,
            names.expert(cfg, layer, e).up,
            names.expert(cfg, layer, e).down,
        )
    }


def test_reads_only_hosted_expert_tensors(config: ModelConfig) -> None:
    fresh = _random_source(config)
    ExpertPart.from_source(fresh, config, [4, 1])
    assert fresh.names_read == _tensor_names(config, (1, 4))


@pytest.mark.parametrize("layer", [1, 4, -1])
def test_non_moe_layer_is_rejected(config: ModelConfig, source: DictTensorSource, layer: int) -> None:
    part = ExpertPart.from_source(source, config, [0, 1])
    x, ids, w = _routing(2, seed=4)
    with pytest.raises(InvalidArgument, match=f"layer {layer} is not an MoE layer"):
        part.compute(layer, x, ids.clamp(max=1), w)


@pytest.mark.parametrize("bad_id", [2, 5, -2])
def test_unhosted_expert_is_rejected(config: ModelConfig, source: DictTensorSource, bad_id: int) -> None:
    part = ExpertPart.from_source(source, config, [0, 1])
    x = torch.randn(2, HIDDEN)
    ids = torch.tensor([[0, 1, -1], [1, bad_id, 0]])
    with pytest.raises(InvalidArgument, match=f"\\[{bad_id}\\]"):
        part.compute(0, x, ids, torch.ones(2, K))


def test_malformed_inputs_are_rejected(config: ModelConfig, source: DictTensorSource) -> None:
    part = ExpertPart.from_source(source, config, [0, 1])
    x, ids, w = _routing(2, seed=5)
    ids = ids.clamp(max=1)
    with pytest.raises(InvalidArgument):
        part.compute(0, x[:, :3], ids, w)
    with pytest.raises(InvalidArgument):
        part.compute(0, x, ids[:1], w)
    with pytest.raises(InvalidArgument):
        part.compute(0, x, ids.float(), w)


@pytest.mark.parametrize("ids", [[], [0, 0], [5], [-1]])
def test_bad_hosted_sets_are_rejected(config: ModelConfig, source: DictTensorSource, ids: list[int]) -> None:
    with pytest.raises(InvalidArgument):
        ExpertPart.from_source(source, config, ids)


def test_parts_read_only_their_tensors_from_a_checkpoint(
    tiny_model_factory: Callable[[str], TinyModel],
) -> None:
    tiny = tiny_model_factory("qwen2-k4-shared-kv3")
    cfg = tiny.config
    with CheckpointReader(tiny.path) as reader:
        AttentionPart.from_source(reader, cfg)
        assert not any(".experts." in n for n in reader.tensors_read)
        assert any("shared_expert" in n for n in reader.tensors_read)
    with CheckpointReader(tiny.path) as reader:
        ExpertPart.from_source(reader, cfg, [2, 3])
        assert reader.tensors_read == _tensor_names(cfg, (2, 3))


def test_device_local_ids_mask_bad_ids_and_match_the_checked_path(
    config: ModelConfig, source: DictTensorSource
) -> None:
    part = ExpertPart.from_source(source, config, (1, 3))
    x, _, w = _routing(5, seed=4)
    ids = torch.tensor([[1, 3, -1], [3, -1, 1], [-1, -1, -1], [2, 1, 3], [EXPERTS, -7, 1]], dtype=torch.int32)
    local, bad = part.device_local_ids(ids)
    assert local.tolist() == [[0, 1, -1], [1, -1, 0], [-1, -1, -1], [-1, 0, 1], [-1, -1, 0]]
    f, t = False, True
    assert bad.tolist() == [[f, f, f], [f, f, f], [f, f, f], [t, f, f], [t, t, f]]
    good = torch.where(bad, -1, ids).to(torch.int32)  # what the checked path computes for the good slots
    torch.testing.assert_close(part.compute_local(0, x, local, w), part.compute(0, x, good, w))


@pytest.mark.parametrize("layer_agnostic", [True, False])
def test_out_receives_the_same_values_as_a_new_tensor(
    config: ModelConfig, source: DictTensorSource, layer_agnostic: bool
) -> None:
    part = ExpertPart.from_source(source, config, range(EXPERTS))
    part.layer_agnostic = layer_agnostic
    x, ids, w = _routing(9, seed=4)
    ids[2] = -1  # a row no expert here computes: zero in ``out`` too, whatever it held
    out = torch.full_like(x, 7.0)  # stale values, as a reused buffer holds
    got = part.compute_into(3, x, ids, w, out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, part.compute(3, x, ids, w))
    assert bool((out[2] == 0).all())


@pytest.mark.parametrize(
    "out",
    [torch.zeros(4, HIDDEN), torch.zeros(5, HIDDEN + 1), torch.zeros(5, HIDDEN, dtype=torch.bfloat16)],
)
def test_out_of_the_wrong_shape_or_dtype_is_rejected(
    config: ModelConfig, source: DictTensorSource, out: torch.Tensor
) -> None:
    part = ExpertPart.from_source(source, config, range(EXPERTS))
    x, ids, w = _routing(5, seed=5)
    with pytest.raises(InvalidArgument, match="out is"):
        part.compute_into(0, x, ids, w, out)
