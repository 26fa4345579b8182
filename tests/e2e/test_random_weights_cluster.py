"""A local cluster on ``--model random:DIR`` (config.json only): every rank generates the same seeded
weights, so token-id prompts give the in-process reference's answers; text prompts need a tokenizer."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch

from asap.client import AsapClient, InvalidArgument
from asap.cluster import ClusterSpec, LocalCluster
from asap.model.reference import load_model
from asap.model.sampling import first_token

pytestmark = pytest.mark.slow


def test_token_prompts_equal_the_reference_and_text_is_refused(qwen3_dir: Path, tmp_path: Path) -> None:
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(qwen3_dir / "config.json", arch / "config.json")  # no weights, no tokenizer
    spec = ClusterSpec(model=f"random:{arch}", attention=2, experts=2, port=0, threads=1, min_batch_tokens=0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 7, 64, 300, 33, 128)]
    log = io.StringIO()
    cluster = LocalCluster(spec, out=log, start_timeout_s=120)
    try:
        address = cluster.start()
        with AsapClient.connect_sync(address, timeout_s=60, retries=0) as client:
            results = client.prefill_many([{"tokens": p, "top_logprobs": 3} for p in prompts])
            with pytest.raises(InvalidArgument, match="no tokenizer"):
                client.prefill(text="hello")
            assert client.prefill(tokens=[1, 2, 3]).prompt_tokens == 3, "still serving after a bad request"
    finally:
        cluster.stop()
    assert "random weights for" in log.getvalue()
    attention, experts = load_model(f"random:{arch}")
    for prompt, result in zip(prompts, results, strict=True):
        expected = first_token(attention.forward([torch.tensor(prompt)], experts)[0], top_logprobs=3)
        assert result.prompt_tokens == len(prompt)
        assert result.first_token_id == expected.token_id
        assert abs(result.first_token_logprob - expected.logprob) <= 1e-4
        assert [t for t, _ in result.top_logprobs] == [t for t, _ in expected.top_logprobs]
