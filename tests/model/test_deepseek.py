"""deepseek_v3 pieces on their own: config parsing, group-limited routing, YaRN, FP8 blocks, make-tiny."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from asap.errors import CheckpointError, InvalidArgument
from asap.model.checkpoint import CheckpointReader, check_checkpoint
from asap.model.config import load_config, parse_config
from asap.model.deepseek import group_limited_route, yarn_inv_freq
from asap.model.deepseek_config import softmax_scale
from asap.model.fp8 import dequantize_blocks, quantize_blocks, scale_name
from asap.model.reference import load_model
from asap.model.tiny import make_tiny
from tests.model.conftest import random_prompt
from tests.model.deepseek_cases import CASES, build_deepseek

transformers = pytest.importorskip("transformers")

# DeepSeek-V3's own config.json (the release), layer count and vocabulary as published.
RELEASE: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}  # fmt: skip


def test_the_release_config_parses() -> None:
    cfg = parse_config(RELEASE)
    assert cfg.mla is not None and cfg.yarn is not None and cfg.group_routing is not None
    assert (cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.qk_head_dim) == (1536, 512, 192)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (128, 128, 64)
    assert cfg.moe_layer_ids == tuple(range(3, 61))
    assert (cfg.num_experts, cfg.top_k, cfg.shared_expert_intermediate_size) == (256, 8, 2048)
    assert (cfg.group_routing.n_group, cfg.group_routing.topk_group) == (8, 4)
    assert (cfg.yarn.factor, cfg.yarn.original_max_position_embeddings) == (40.0, 4096)
    assert cfg.weight_block_size == (128, 128)
    assert cfg.kv_cache_layout == (1, 512, 64)
    # the softmax correction of the release: (0.1 * ln 40 + 1) ** 2 / sqrt(192)
    assert softmax_scale(cfg.mla, cfg.yarn) == pytest.approx((0.1 * 3.6888794541 + 1) ** 2 / 192**0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
        ({"topk_method": "group_limited_greedy"}, "topk_method"),
        ({"n_group": 6}, "must split into n_group=6 groups"),
        ({"topk_group": 9}, "topk_group=9 must not exceed"),
        ({"num_experts_per_tok": 300}, "exceeds n_routed_experts=256"),
        ({"n_group": 256}, "groups of >= 2"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"qk_rope_head_dim": 63}, "even"),
    ],
)
def test_configs_transformers_would_mis_compute_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_config(RELEASE | change)


def test_kv_heads_are_not_read() -> None:
    """MLA has no kv heads; transformers' config defaults num_key_value_heads to 128 for any head count."""
    assert parse_config(RELEASE | {"num_key_value_heads": 16}) == parse_config(RELEASE)
    assert parse_config(RELEASE | {"num_key_value_heads": None}).num_kv_heads == 128


def test_missing_keys_take_transformers_defaults() -> None:
    raw = {k: RELEASE[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "num_experts_per_tok")}  # fmt: skip
    cfg = parse_config(raw)
    hf = transformers.DeepseekV3Config(**raw)
    assert cfg.mla is not None and cfg.group_routing is not None
    assert (cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.rope_interleave) == (
        hf.q_lora_rank,
        hf.kv_lora_rank,
        hf.rope_interleave,
    )
    assert (cfg.group_routing.n_group, cfg.group_routing.topk_group) == (hf.n_group, hf.topk_group)
    assert cfg.group_routing.routed_scaling_factor == hf.routed_scaling_factor
    assert cfg.moe_layers.index(True) == hf.first_k_dense_replace
    assert cfg.num_experts == hf.n_routed_experts and cfg.yarn is None


def _brute_force_route(
    scores: torch.Tensor, bias: torch.Tensor, groups: int, topk_group: int, k: int
) -> list[set[int]]:
    """Per token: the best k biased scores among the experts of the best topk_group groups."""
    chosen = []
    per = scores.shape[1] // groups
    for row in scores + bias:
        group_score = {g: sum(sorted(row[g * per : (g + 1) * per].tolist())[-2:]) for g in range(groups)}
        best = sorted(group_score, key=lambda g: -group_score[g])[:topk_group]
        eligible = [e for g in best for e in range(g * per, (g + 1) * per)]
        chosen.append(set(sorted(eligible, key=lambda e: -float(row[e]))[:k]))
    return chosen


@pytest.mark.parametrize(("experts", "groups", "topk_group", "k"), [(8, 4, 2, 3), (9, 3, 1, 2), (6, 1, 1, 4)])
@pytest.mark.parametrize("norm", [True, False])
def test_group_limited_routing_against_a_brute_force(
    experts: int, groups: int, topk_group: int, k: int, norm: bool
) -> None:
    raw = RELEASE | dict(n_routed_experts=experts, n_group=groups, topk_group=topk_group,
                         num_experts_per_tok=k, norm_topk_prob=norm, routed_scaling_factor=1.7,
                         hidden_size=16, num_hidden_layers=1, first_k_dense_replace=0)  # fmt: skip
    cfg = parse_config(raw)
    g = torch.Generator().manual_seed(experts * 10 + k)
    router, h = torch.randn(experts, 16, generator=g), torch.randn(50, 16, generator=g)
    bias = torch.randn(experts, generator=g) * 0.3
    ids, weights = group_limited_route(cfg, router, bias, h.to(torch.bfloat16))
    scores = torch.sigmoid(h.to(torch.bfloat16).float() @ router.T)  # float32 routing of bf16 states
    assert [set(row.tolist()) for row in ids] == _brute_force_route(scores, bias, groups, topk_group, k)
    expected = scores.gather(1, ids)  # the unbiased scores: the bias picks, it never weighs
    if norm:
        expected = expected / expected.sum(-1, keepdim=True)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected * 1.7)


@pytest.mark.parametrize(
    "params",
    [dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
     dict(factor=4.0, original_max_position_embeddings=16),
     dict(factor=8.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2, mscale=0.7)],
)  # fmt: skip
@pytest.mark.parametrize("rope_dim", [64, 6])
def test_yarn_frequencies_are_transformers_own(params: dict[str, Any], rope_dim: int) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **params}
    raw = RELEASE | {
        "qk_rope_head_dim": rope_dim,
        "rope_parameters": rope,
        "max_position_embeddings": 1 << 16,
    }
    raw.pop("rope_scaling")
    cfg = parse_config(raw)
    assert cfg.yarn is not None and cfg.head_dim == rope_dim
    hf = transformers.DeepseekV3Config(**{k: v for k, v in raw.items() if k != "quantization_config"})
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    inv_freq, factor = yarn_inv_freq(rope_dim, cfg.rope_theta, cfg.yarn, torch.device("cpu"))
    assert torch.equal(inv_freq, hf_inv_freq) and factor == hf_factor


def test_dequantized_blocks_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 130, generator=g) * torch.linspace(0.01, 3, 130)
    fp8, scale = quantize_blocks(weight, (128, 128))
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (2, 2)
    restored = dequantize_blocks(fp8, scale, (128, 128))
    assert restored.dtype == torch.bfloat16
    assert ((restored.float() - weight).abs() <= weight.abs() * 0.07 + 1e-3).all()
    with pytest.raises(CheckpointError, match="needs scales"):
        dequantize_blocks(fp8, scale[:1], (128, 128))


def _quantized_copy(src: Path, dst: Path, block: tuple[int, int]) -> Path:
    """``src`` with every matrix but the routers and embeddings stored block-FP8, as the release is; and
    beside it (``dst``-dequant) the same weights dequantised, float32, for transformers."""
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if t.ndim == 2 and "embed" not in name and "lm_head" not in name and ".gate.weight" not in name:
            fp8, scale = quantize_blocks(t, block)
            quantized[name], quantized[scale_name(name)] = fp8, scale
            dequantized[name] = dequantize_blocks(fp8, scale, block).float()
        else:
            quantized[name] = dequantized[name] = t
    raw = json.loads((src / "config.json").read_text())
    for out, weights, quant in (
        (dst, quantized, True),
        (dst.with_name(dst.name + "-dequant"), dequantized, False),
    ):
        out.mkdir()
        config = raw | ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                        "dynamic", "weight_block_size": list(block)}} if quant else {})  # fmt: skip
        (out / "config.json").write_text(json.dumps(config))
        save_file(weights, str(out / "model.safetensors"))
    return dst


def test_an_fp8_checkpoint_loads_dequantized(tmp_path: Path) -> None:
    tiny = build_deepseek(tmp_path / "float", CASES["lora-g4t2-k3-norm-yarn-dense1"])
    fp8_dir = _quantized_copy(tiny.path, tmp_path / "fp8", (16, 8))  # blocks smaller than the matrices
    cfg = load_config(fp8_dir)
    assert cfg.weight_block_size == (16, 8)
    with CheckpointReader(fp8_dir) as reader:
        check_checkpoint(reader, cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp8-dequant", dtype=torch.float32, experts_implementation="eager"
    ).eval()
    attention, experts = load_model(fp8_dir, expert_ranks=2)
    prompts = [random_prompt(n, cfg.vocab_size, seed=n) for n in (1, 9, 30)]
    with torch.no_grad():
        reference = torch.stack([hf(input_ids=p[None]).logits[0, -1] for p in prompts])
    ours = torch.cat([attention.forward([p], experts) for p in prompts])
    assert (ours - reference).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    # the unquantised model differs: the checkpoint really was read quantised
    float_attention, float_experts = load_model(tiny.path)
    assert (float_attention.forward(prompts[1:2], float_experts) - ours[1]).abs().max().item() > 1e-3


def test_fp8_tensors_without_a_quantization_config_are_refused(tmp_path: Path) -> None:
    tiny = build_deepseek(tmp_path / "float", CASES["lora-g2t1-k1-norm-yarn-alldim-kv128"])
    fp8_dir = _quantized_copy(tiny.path, tmp_path / "fp8", (128, 128))
    raw = json.loads((fp8_dir / "config.json").read_text())
    del raw["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="declares no block-wise fp8"):
        load_model(fp8_dir)


def test_make_tiny_deepseek(tmp_path: Path) -> None:
    path = make_tiny(tmp_path / "m", arch="deepseek_v3", layers=3, hidden=32, experts=6, top_k=3, heads=2)
    cfg = load_config(path)
    assert cfg.mla is not None and cfg.yarn is not None and cfg.group_routing is not None
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mla.qk_head_dim) == (2, 2, 8, 24)
    assert cfg.moe_layers == (False, True, True)
    assert (cfg.group_routing.n_group, cfg.group_routing.topk_group) == (2, 1)
    with CheckpointReader(path) as reader:
        check_checkpoint(reader, cfg)
        bias = reader.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max().item() > 0  # random, so a bias applied to the weights would show
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    attention, experts = load_model(path, expert_ranks=3)
    prompt = random_prompt(20, cfg.vocab_size, seed=3)
    with torch.no_grad():
        reference = hf(input_ids=prompt[None]).logits[0, -1]
    assert (attention.forward([prompt], experts)[0] - reference).abs().max().item() <= 1e-4


def test_all_routing_combinations_are_reachable() -> None:
    """The brute force above really exercises the group limit: some token's best plain top-k lies
    outside its best groups."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(200, 8, generator=g)
    limited = _brute_force_route(scores, torch.zeros(8), 4, 2, 3)
    plain = [set(row.topk(3).indices.tolist()) for row in scores]
    assert any(a != b for a, b in zip(limited, plain, strict=True))
    assert len({frozenset(c) for c in limited}) > 10
    assert all(len(c) == 3 for c in limited)
