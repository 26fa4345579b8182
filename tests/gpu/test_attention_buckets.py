"""On CUDA a prompt's attention runs padded to its length bucket: the real rows equal the unpadded
computation (bf16, the SDPA backend torch picks, GQA as in the headline model)."""

from __future__ import annotations

import pytest
import torch

from asap.model.layers import attention_length_bucket, causal_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n", [1, 7, 64, 65, 517, 1025, 3000])
def test_padded_attention_equals_unpadded(n: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(n, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert attention_length_bucket(n) >= n
    default = causal_attention(q, k, v, scale=128**-0.5)  # padded: the CUDA default
    plain = causal_attention(q, k, v, scale=128**-0.5, pad_to_bucket=False)
    assert default.shape == plain.shape == (n, 32, 128)
    torch.testing.assert_close(default.float(), plain.float(), rtol=2e-2, atol=2e-2)
