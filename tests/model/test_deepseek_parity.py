"""deepseek_v3 logits of asap.model against transformers' own DeepseekV3ForCausalLM (tiny, float32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from asap.model.chunked_prefill import prefill_chunked
from asap.model.kvcache import KVCache
from asap.model.reference import load_model
from tests.model.conftest import TinyModel, random_prompt
from tests.model.deepseek_cases import CASES, build_deepseek

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 7, 33)
BATCH = (5, 1, 33, 12, 2)
ATOL = 1e-4


@pytest.fixture(scope="session")
def deepseek_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    cache: dict[str, TinyModel] = {}

    def factory(name: str) -> TinyModel:
        if name not in cache:
            cache[name] = build_deepseek(tmp_path_factory.mktemp(name), CASES[name])
        return cache[name]

    return factory


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, deepseek_factory: Callable[[str], TinyModel]) -> TinyModel:
    return deepseek_factory(request.param)


def _prompts(tiny: TinyModel, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    return [random_prompt(n, tiny.config.vocab_size, seed=100 + i * 7 + n) for i, n in enumerate(lengths)]


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs logits diff {diff:.3g} > {atol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_the_case_is_parsed_as_transformers_configured_it(tiny: TinyModel) -> None:
    hf, cfg = tiny.hf.config, tiny.config
    assert cfg.mla is not None and cfg.group_routing is not None
    assert (cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.v_head_dim) == (
        hf.q_lora_rank,
        hf.kv_lora_rank,
        hf.v_head_dim,
    )
    assert (cfg.group_routing.n_group, cfg.group_routing.topk_group) == (hf.n_group, hf.topk_group)
    assert cfg.moe_layer_ids == tuple(range(hf.first_k_dense_replace, hf.num_hidden_layers))
    assert (cfg.yarn is not None) == (hf.rope_parameters["rope_type"] == "yarn")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_logits_match_transformers(tiny: TinyModel, ranks: int) -> None:
    attention, experts = load_model(tiny.path, expert_ranks=ranks)
    for prompt in _prompts(tiny, LENGTHS):
        _assert_matches(attention.forward([prompt], experts), tiny.hf_logits(prompt)[None])
    batch = _prompts(tiny, BATCH)
    reference = torch.stack([tiny.hf_logits(p) for p in batch])
    _assert_matches(attention.forward(batch, experts), reference)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_prefill_matches_transformers(tiny: TinyModel, chunk_size: int) -> None:
    attention, experts = load_model(tiny.path, expert_ranks=2)
    (prompt,) = _prompts(tiny, (33,))
    _assert_matches(prefill_chunked(attention, experts, prompt, chunk_size), tiny.hf_logits(prompt))


def test_the_cache_keeps_the_compressed_latent(tiny: TinyModel) -> None:
    attention, experts = load_model(tiny.path)
    mla = tiny.config.mla
    assert mla is not None
    cache = KVCache(tiny.config.num_layers)
    (prompt,) = _prompts(tiny, (9,))
    attention.forward([prompt], experts, caches=[cache])
    for layer in range(tiny.config.num_layers):
        assert cache.keys(layer).shape == (1, 9, mla.kv_lora_rank)
        assert cache.values(layer).shape == (1, 9, mla.qk_rope_head_dim)
    # what transformers' own cache holds: the normed latent and the rotated shared RoPE key
    with torch.no_grad():
        out = tiny.hf(input_ids=prompt[None], use_cache=True)
    hf_latent, hf_rope = out.past_key_values.layers[0].keys, out.past_key_values.layers[0].values
    torch.testing.assert_close(cache.keys(0)[None], hf_latent, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.values(0)[None], hf_rope, atol=1e-6, rtol=0)


def test_the_correction_bias_is_used(tiny: TinyModel) -> None:
    """Guards the parity test's power: zeroing the biases changes the logits well beyond ATOL."""
    attention, experts = load_model(tiny.path)
    batch = _prompts(tiny, BATCH)
    full = attention.forward(batch, experts)
    for w in attention.layers:
        if w.router_bias is not None:
            w.router_bias.zero_()
    assert (attention.forward(batch, experts) - full).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("name", ["lora-g4t2-k3-norm-yarn-dense1", "noqlora-g1-k2-nonorm-rope-bias-shared2"])
def test_bfloat16_matches_transformers(name: str, deepseek_factory: Callable[[str], TinyModel]) -> None:
    tiny = deepseek_factory(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, dtype=torch.bfloat16, experts_implementation="eager"
    ).eval()
    prompts = _prompts(tiny, (7, 33))
    with torch.no_grad():
        reference = torch.stack([hf(input_ids=p[None]).logits[0, -1].float() for p in prompts])
    attention, experts = load_model(tiny.path, dtype=torch.bfloat16, expert_ranks=2)
    ours = torch.cat([attention.forward([p], experts) for p in prompts])
    assert (ours - reference).abs().max().item() <= 0.05
    assert attention.layers[-1].router is not None and attention.layers[-1].router.dtype == torch.float32


def test_a_checkpoint_without_biases_is_refused(tiny: TinyModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from asap.errors import CheckpointError

    tensors = load_file(str(tiny.path / "model.safetensors"))
    dropped = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
    (tmp_path / "config.json").write_text((tiny.path / "config.json").read_text())
    save_file(dropped, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="e_score_correction_bias"):
        load_model(tmp_path)
