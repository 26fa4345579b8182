"""DeepSeek Sparse Attention in the emulated cost model: dense below the top-k, linear growth beyond."""

from __future__ import annotations

import pytest

from asap.emulation import costs
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, SparseAttention, parse_config
from tests.model.test_deepseek import RELEASE

ASCEND = load_profile("ascend910")
DSA = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}


def deepseek(**over: object) -> ModelConfig:
    return parse_config(RELEASE | {"num_hidden_layers": 5} | over)


def test_the_indexer_keys_are_read_from_config_json() -> None:
    assert deepseek().sparse_attention is None
    assert deepseek(**DSA).sparse_attention == SparseAttention(2048, 64, 128)
    with pytest.raises(InvalidArgument, match="index_topk"):
        deepseek(**(DSA | {"index_topk": 0}))


def test_within_the_top_k_sparse_attention_costs_what_dense_attention_does() -> None:
    dense, sparse = deepseek(), deepseek(**DSA)
    for lengths in ([16], [512, 1536], [2048]):
        assert costs.attention_layer_kernels(sparse, 3, lengths, 2) == costs.attention_layer_kernels(
            dense, 3, lengths, 2
        )
    assert costs.indexer_kernels(sparse, [2048], 2) == []
    # a chunk whose context (prefix + chunk) passes the top-k is indexed
    assert costs.indexer_kernels(sparse, [1024], 2, prefix_lengths=[1024]) == []
    assert costs.indexer_kernels(sparse, [1024], 2, prefix_lengths=[1025]) != []


def test_core_attention_grows_linearly_beyond_the_crossover_and_never_exceeds_dense() -> None:
    dense, sparse = deepseek(), deepseek(**DSA)
    lengths = [4096, 8192, 16384, 32768, 65536]
    d = [costs.causal_attention(dense, [n], 2).flops for n in lengths]
    s = [costs.causal_attention(sparse, [n], 2).flops for n in lengths]
    assert all(si <= di for si, di in zip(s, d, strict=True))
    assert s[:2] == d[:2]  # MQA mode's 3.4x cost per pair loses to masked dense up to ~12.8k tokens
    assert s[3] < d[3] / 2
    # beyond the crossover each doubling adds ~ a constant per token: increments double, not quadruple
    assert (s[4] - s[3]) / (s[3] - s[2]) == pytest.approx(2.0, rel=0.05)
    assert (d[4] - d[3]) / (d[3] - d[2]) == pytest.approx(4.0, rel=0.05)


def test_the_indexer_is_quadratic_at_a_fifth_of_dense_attention_at_half_weight() -> None:
    sparse = deepseek(**DSA)
    score = costs.indexer_kernels(sparse, [8192], 2)[4]
    pairs = 8192 * 8193 // 2
    assert score.flops == 64 * 128 * pairs  # 2 x heads x dim a pair, 8-bit at twice the 16-bit rate
    dense = costs.causal_attention(deepseek(), [8192], 2).flops
    assert score.flops / dense == pytest.approx(64 * 128 / (2 * 128 * (192 + 128)))
    # the whole layer of an 8k prompt costs a little more with the indexer than dense, 32k less
    for n, more in ((8192, True), (32768, False)):
        with_dsa = costs.attention_layer_s(sparse, 3, [n], ASCEND, 2)
        without = costs.attention_layer_s(deepseek(), 3, [n], ASCEND, 2)
        assert (with_dsa > without) is more
