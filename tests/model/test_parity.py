"""Logits of asap.model against transformers' own implementation on tiny random checkpoints."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from asap.model.attention_part import AttentionPart, MoERequest
from asap.model.checkpoint import CheckpointReader
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement, InProcessExperts
from asap.model.reference import load_model, prefill_reference
from tests.model.conftest import CASES, TinyModel, random_prompt

LENGTHS = (1, 7, 33)
BATCH = (5, 1, 33, 12, 2)
ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request: pytest.FixtureRequest, tiny_model_factory: Callable[[str], TinyModel]) -> TinyModel:
    return tiny_model_factory(request.param)


def _prompts(tiny: TinyModel, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    return [random_prompt(n, tiny.config.vocab_size, seed=100 + i * 7 + n) for i, n in enumerate(lengths)]


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs logits diff {diff:.3g} > {atol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_logits_match_transformers(tiny: TinyModel, ranks: int) -> None:
    attention, experts = load_model(tiny.path, expert_ranks=ranks)
    assert len(experts.parts) == ranks
    for prompt in _prompts(tiny, LENGTHS):
        _assert_matches(attention.forward([prompt], experts), tiny.hf_logits(prompt)[None])
    batch = _prompts(tiny, BATCH)
    reference = torch.stack([tiny.hf_logits(p) for p in batch])
    _assert_matches(attention.forward(batch, experts), reference)


def test_non_contiguous_placement_matches(tiny: TinyModel) -> None:
    # experts dealt round-robin over two ranks, the reverse of the default contiguous blocks
    e = tiny.config.num_experts
    placement = ExpertPlacement.from_assignment([range(1, e, 2), range(0, e, 2)])
    with CheckpointReader(tiny.path) as source:
        attention = AttentionPart.from_source(source, tiny.config)
        parts = [ExpertPart.from_source(source, tiny.config, placement.experts_of(r)) for r in range(2)]
    batch = _prompts(tiny, BATCH)
    reference = torch.stack([tiny.hf_logits(p) for p in batch])
    _assert_matches(prefill_reference((attention, InProcessExperts(parts, placement)), batch), reference)


def test_forward_steps_yields_each_moe_layer(tiny: TinyModel) -> None:
    attention, experts = load_model(tiny.path)
    cfg = tiny.config
    batch = _prompts(tiny, BATCH)
    steps = attention.forward_steps(batch)
    seen: list[int] = []
    try:
        request = next(steps)
        while True:
            assert isinstance(request, MoERequest)
            seen.append(request.layer)
            t = sum(BATCH)
            assert request.hidden.shape == (t, cfg.hidden_size)
            assert request.topk_ids.shape == (t, cfg.top_k) and request.topk_ids.dtype == torch.int64
            assert request.topk_weights.dtype == torch.float32
            assert bool(((request.topk_ids >= 0) & (request.topk_ids < cfg.num_experts)).all())
            if cfg.norm_topk_prob:
                torch.testing.assert_close(request.topk_weights.sum(-1), torch.ones(t), atol=1e-2, rtol=0)
            request = steps.send(experts(request))
    except StopIteration as stop:
        logits = stop.value
    assert seen == list(cfg.moe_layer_ids)
    assert logits.shape == (len(BATCH), cfg.vocab_size)


def test_routed_experts_change_the_logits(tiny: TinyModel) -> None:
    """Guards the parity test's power: with experts switched off the logits move well beyond ATOL."""
    attention, experts = load_model(tiny.path)
    batch = _prompts(tiny, BATCH)
    full = attention.forward(batch, experts)
    without = attention.forward(batch, lambda r: torch.zeros_like(r.hidden))
    assert (full - without).abs().max().item() > 100 * ATOL


def test_generator_resumed_from_other_threads(tiny: TinyModel) -> None:
    attention, experts = load_model(tiny.path, expert_ranks=2)
    batch = _prompts(tiny, BATCH)
    expected = attention.forward(batch, experts)
    steps = attention.forward_steps(batch)
    threads: set[int] = set()

    def resume(value: torch.Tensor | None) -> MoERequest:
        threads.add(threading.get_ident())
        return next(steps) if value is None else steps.send(value)

    with ThreadPoolExecutor(max_workers=2) as pool:
        request = pool.submit(resume, None).result()
        try:
            while True:
                request = pool.submit(resume, experts(request)).result()
        except StopIteration as stop:
            logits = stop.value
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("name", ["mixtral-k2-window", "qwen3-k4-nonorm-window"])
def test_sliding_window_is_applied(name: str, tiny_model_factory: Callable[[str], TinyModel]) -> None:
    tiny = tiny_model_factory(name)
    window = tiny.config.sliding_window
    assert window is not None
    attention, experts = load_model(tiny.path)
    unwindowed = AttentionPart(
        dataclasses.replace(tiny.config, sliding_window=None),
        embed=attention.embed,
        layers=attention.layers,
        final_norm=attention.final_norm,
        lm_head=attention.lm_head,
        dtype=attention.dtype,
        device=attention.device,
    )
    short, long = _prompts(tiny, (window, 33))
    assert torch.equal(attention.forward([short], experts), unwindowed.forward([short], experts))
    assert (attention.forward([long], experts) - unwindowed.forward([long], experts)).abs().max() > 100 * ATOL


@pytest.mark.parametrize(
    "name", ["qwen3-k4-nonorm-window", "qwen2-k4-shared-kv3", "mixtral-k2-window", "olmoe-k4-clip"]
)
def test_bfloat16_matches_transformers(name: str, tiny_model_factory: Callable[[str], TinyModel]) -> None:
    tiny = tiny_model_factory(name)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny.path, dtype=torch.bfloat16, experts_implementation="eager"
    ).eval()
    hf_tiny = TinyModel(name=name, path=tiny.path, config=tiny.config, hf=hf)
    prompts = _prompts(tiny, (7, 33))
    reference = torch.stack([hf_tiny.hf_logits(p) for p in prompts])
    for ranks, atol in ((1, 0.02), (3, 0.05)):
        # one part follows transformers' bf16 rounding step by step (bit-exact on the machines we tried);
        # a split sums the ranks' partials in another order, a few bf16 ulps apart
        attention, experts = load_model(tiny.path, dtype=torch.bfloat16, expert_ranks=ranks)
        ours = torch.cat([attention.forward([p], experts) for p in prompts])
        assert (ours - reference).abs().max().item() <= atol
    assert attention.forward(prompts, experts).dtype == torch.float32
