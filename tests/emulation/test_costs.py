from __future__ import annotations

import pytest

from asap.emulation import costs
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, parse_config

H200 = load_profile("h200")


def qwen3(**over: object) -> ModelConfig:
    raw: dict[str, object] = {
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "mlp_only_layers": [0],
        "max_position_embeddings": 40960,
    }
    return parse_config(raw | over)


def test_attention_grows_with_tokens_and_prompt_length() -> None:
    cfg = qwen3()
    by_len = [costs.attention_layer_s(cfg, 1, [n], H200, 2) for n in (64, 512, 4096, 16384, 32768)]
    assert by_len == sorted(by_len) and by_len[-1] > 3 * by_len[-2]  # quadratic term dominates
    # the same tokens as many short prompts cost less than one long one (no cross-prompt attention)
    assert costs.attention_layer_s(cfg, 1, [1024] * 16, H200, 2) < costs.attention_layer_s(
        cfg, 1, [16384], H200, 2
    )


def test_dense_layer_and_chunk_prefix_cost_more() -> None:
    cfg = qwen3()
    assert costs.attention_layer_s(cfg, 0, [4096], H200, 2) > costs.attention_layer_s(cfg, 1, [4096], H200, 2)
    fresh = costs.attention_layer_s(cfg, 1, [4096], H200, 2)
    assert costs.attention_layer_s(cfg, 1, [4096], H200, 2, prefix_lengths=[8192]) > fresh
    with pytest.raises(InvalidArgument):
        costs.attention_layer_s(cfg, 1, [4096], H200, 2, prefix_lengths=[1, 2])


def test_sliding_window_caps_attention() -> None:
    windowed = qwen3(use_sliding_window=True, sliding_window=1024)
    assert windowed.sliding_window == 1024
    full = costs.causal_attention(qwen3(), [8192], 2).flops
    assert costs.causal_attention(windowed, [8192], 2).flops < full / 3


def test_expert_call_monotonic_and_reads_touched_weights_once() -> None:
    cfg = qwen3()
    calls = [costs.expert_call_s([t] * 32, cfg, H200, 2) for t in (1, 16, 256, 1024, 4096)]
    assert calls == sorted(calls) and calls[-1] > 2 * calls[0]
    assert costs.expert_call_s([0] * 32, cfg, H200, 2) == 0.0

    # weights are read once per touched expert: the same 64 rows on 1 expert move 1/32 of the weights
    def device_s(rows: list[int]) -> float:
        return sum(costs.kernel_s(k, H200) for k in costs.grouped_mlp(rows, 2048, 768, 2))

    assert device_s([64] + [0] * 31) < device_s([2] * 32) / 10
    with pytest.raises(InvalidArgument):
        costs.expert_call_s([-1], cfg, H200, 2)


def test_lm_head_and_transfer() -> None:
    cfg = qwen3()
    assert 0 < costs.lm_head_s(1, cfg, H200, 2) < costs.lm_head_s(4096, cfg, H200, 2)
    assert costs.transfer_s(450_000_000, H200) == pytest.approx(1e-3)
    assert costs.transfer_s(1 << 20, load_profile("ascend910")) > costs.transfer_s(1 << 20, H200)
    with pytest.raises(InvalidArgument):
        costs.lm_head_s(0, cfg, H200, 2)


def test_floor_is_launch_bound() -> None:
    kernels = [costs.elementwise(1, 1, 2)] * 5
    assert costs.stream_s(kernels, H200) == pytest.approx(5 * H200.launch_us * 1e-6, rel=1e-3)


def test_a_request_alone_costs_its_layers_experts_and_head() -> None:
    cfg = qwen3()
    attention = sum(costs.attention_layer_s(cfg, layer, [512], H200, 2) for layer in range(cfg.num_layers))
    head = costs.lm_head_s(1, cfg, H200, 2)
    one_rank = costs.request_s(cfg, 512, H200, 2, expert_ranks=1)
    four_ranks = costs.request_s(cfg, 512, H200, 2, expert_ranks=4)
    # 512 tokens x top-8 over 128 experts: 32 rows for every expert; a rank holds 128 / ranks of them.
    expert = costs.expert_call_s([32] * 32, cfg, H200, 2)
    assert four_ranks == pytest.approx(attention + head + expert * len(cfg.moe_layer_ids))
    assert attention + head < four_ranks < one_rank
    assert costs.request_s(cfg, 4096, H200, 2, 4) > four_ranks
    with pytest.raises(InvalidArgument):
        costs.request_s(cfg, 0, H200, 2, 4)


@pytest.mark.parametrize(
    "rows", [[0] * 8, [1] + [0] * 7, [3, 0, 5, 0, 0, 9, 1, 0], [64] * 8, [0, 0, 4096, 1, 0, 0, 0, 2]]
)
def test_expert_call_from_totals_is_the_call_from_the_list(rows: list[int]) -> None:
    cfg = qwen3()
    used = sum(1 for r in rows if r > 0)
    assert costs.expert_call_totals_s(sum(rows), used, cfg, H200, 2) == costs.expert_call_s(
        rows, cfg, H200, 2
    )
    assert costs.grouped_mlp_totals(sum(rows), used, 2048, 768, 2) == costs.grouped_mlp(rows, 2048, 768, 2)


def test_expert_call_from_totals_rejects_negative_counts() -> None:
    with pytest.raises(InvalidArgument):
        costs.expert_call_totals_s(-1, 1, qwen3(), H200, 2)
    with pytest.raises(InvalidArgument):
        costs.expert_call_totals_s(4, -1, qwen3(), H200, 2)
