"""Chunked prefill: a prompt run in consecutive chunks over a KVCache gives the logits of the whole prompt."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.attention_part import AttentionPart, MoERequest
from asap.model.chunked_prefill import prefill_chunked
from asap.model.config import SUPPORTED_MODEL_TYPES
from asap.model.kvcache import KVCache
from asap.model.placement import InProcessExperts
from asap.model.reference import load_model
from asap.model.tiny import make_tiny
from tests.model.conftest import TinyModel, random_prompt

LENGTH = 13
CHUNK_SIZES = (1, 3, 7, LENGTH - 1, LENGTH, LENGTH + 5)
ATOL = 1e-5
MAX_POSITIONS = 64
WINDOW = 4

Model = tuple[AttentionPart, InProcessExperts]


def _make(path: Path, arch: str, *, window: int | None = None) -> Model:
    make_tiny(
        path, arch=arch, layers=2, hidden=32, experts=4, top_k=2, heads=4, kv_heads=2,
        max_position_embeddings=MAX_POSITIONS, init_std=0.1,
    )  # fmt: skip
    if window is not None:
        config_path = path / "config.json"
        raw = json.loads(config_path.read_text())
        raw["sliding_window"] = window
        if arch == "qwen3_moe":
            raw["use_sliding_window"] = True
        config_path.write_text(json.dumps(raw))
    model = load_model(path, expert_ranks=2)
    assert model[0].config.sliding_window == window
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    """Every architecture, plus windowed mixtral and qwen3_moe (window smaller than the prompt)."""
    out = {arch: _make(tmp_path_factory.mktemp(arch), arch) for arch in SUPPORTED_MODEL_TYPES}
    for arch in ("mixtral", "qwen3_moe"):
        out[f"{arch}-window"] = _make(tmp_path_factory.mktemp(f"{arch}-window"), arch, window=WINDOW)
    return out


def _prompt(length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return random_prompt(length, 320, seed=seed)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs logits diff {diff:.3g} > {atol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("name", [*SUPPORTED_MODEL_TYPES, "mixtral-window", "qwen3_moe-window"])
def test_chunked_equals_unchunked(models: dict[str, Model], name: str, chunk_size: int) -> None:
    attention, experts = models[name]
    prompt = _prompt()
    _assert_close(
        prefill_chunked(attention, experts, prompt, chunk_size), attention.forward([prompt], experts)[0]
    )


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_window_reaches_into_the_cache(models: dict[str, Model], arch: str) -> None:
    # the windowed and unwindowed models share weights (same seed): the window visibly changes the
    # logits, so chunked == unchunked above really checks the window against absolute positions
    prompt = _prompt()
    windowed, plain = models[f"{arch}-window"], models[arch]
    assert torch.equal(windowed[0].embed, plain[0].embed)
    diff = prefill_chunked(*windowed, prompt, 3) - prefill_chunked(*plain, prompt, 3)
    assert diff.abs().max().item() > 1000 * ATOL


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral-window"])
def test_batch_mixes_fresh_prompts_and_continued_chunks(models: dict[str, Model], name: str) -> None:
    attention, experts = models[name]
    full = [_prompt(9, seed=1), _prompt(11, seed=2), _prompt(7, seed=3), _prompt(5, seed=4)]
    expected = torch.cat([attention.forward([p], experts) for p in full])  # [4, V]
    caches = [None, KVCache(2), KVCache(2), None]
    attention.forward([full[1][:5]], experts, caches=[caches[1]])  # prompt 1: 5 tokens cached
    attention.forward([full[2][:1]], experts, caches=[caches[2]])  # prompt 2: 1 token cached
    chunks = [full[0], full[1][5:], full[2][1:], full[3]]
    _assert_close(attention.forward(chunks, experts, caches=caches), expected)
    assert [c.length for c in caches if c is not None] == [11, 7]


def test_cache_bookkeeping(models: dict[str, Model]) -> None:
    attention, experts = models["olmoe"]
    cfg = attention.config
    prompt = _prompt()
    cache = KVCache(cfg.num_layers)
    assert cache.length == 0 and cache.nbytes() == 0
    element = torch.empty((), dtype=attention.dtype).element_size()
    for done, chunk in zip((5, 10, 13), _chunks(prompt, 5), strict=True):
        attention.forward([chunk], experts, caches=[cache])
        assert cache.length == done
        for layer in range(cfg.num_layers):
            assert (
                cache.keys(layer).shape == cache.values(layer).shape == (cfg.num_kv_heads, done, cfg.head_dim)
            )
        # buffers double when a chunk does not fit: 5 -> 10 -> 20 tokens of room
        capacity = {5: 5, 10: 10, 13: 20}[done]
        assert cache.nbytes() == 2 * cfg.num_layers * cfg.num_kv_heads * capacity * cfg.head_dim * element
    reserved = KVCache(cfg.num_layers, reserve=LENGTH)
    assert prefill_chunked(attention, experts, prompt, 5).shape == (cfg.vocab_size,)
    attention.forward([prompt[:5]], experts, caches=[reserved])
    assert reserved.nbytes() == 2 * cfg.num_layers * cfg.num_kv_heads * LENGTH * cfg.head_dim * element
    for layer in range(cfg.num_layers):
        assert torch.equal(reserved.keys(layer), cache.keys(layer)[:, :5])


def test_abandoned_pass_leaves_the_cache_unchanged(models: dict[str, Model]) -> None:
    attention, experts = models["qwen3_moe"]
    prompt = _prompt()
    cache = KVCache(attention.config.num_layers)
    attention.forward([prompt[:6]], experts, caches=[cache])
    steps = attention.forward_steps([_prompt(4, seed=9)], caches=[cache])  # a chunk that is cancelled
    next(steps)
    steps.close()
    assert cache.length == 6
    logits = attention.forward([prompt[6:]], experts, caches=[cache])[0]
    _assert_close(logits, attention.forward([prompt], experts)[0])


def test_position_overflow(models: dict[str, Model]) -> None:
    attention, experts = models["mixtral"]
    cache = KVCache(attention.config.num_layers)
    attention.forward([_prompt(60)], experts, caches=[cache])
    match = f"60 cached tokens \\+ a chunk of 5 = 65 .*max_position_embeddings={MAX_POSITIONS}"
    with pytest.raises(InvalidArgument, match=match):
        attention.forward_steps([_prompt(5)], caches=[cache])
    attention.forward([_prompt(4)], experts, caches=[cache])  # exactly up to the limit is fine
    assert cache.length == MAX_POSITIONS


def test_bad_caches(models: dict[str, Model]) -> None:
    attention, _ = models["mixtral"]
    layers = attention.config.num_layers
    with pytest.raises(InvalidArgument, match="2 KV caches given for 1 prompts"):
        attention.forward_steps([[1, 2]], caches=[KVCache(layers), None])
    with pytest.raises(InvalidArgument, match="0 KV caches given for 1 prompts"):
        attention.forward_steps([[1, 2]], caches=[])
    shared = KVCache(layers)
    with pytest.raises(InvalidArgument, match="same batch"):
        attention.forward_steps([[1, 2], [3]], caches=[shared, shared])
    with pytest.raises(InvalidArgument, match=f"prompt 1: KV cache has 5 layers, the model {layers}"):
        attention.forward_steps([[1, 2], [3]], caches=[None, KVCache(5)])
    with pytest.raises(InvalidArgument, match="num_layers=0"):
        KVCache(0)


def test_cache_of_another_model_is_refused(models: dict[str, Model]) -> None:
    mixtral, experts = models["mixtral"]
    cache = KVCache(mixtral.config.num_layers)
    mixtral.forward([[1, 2, 3]], experts, caches=[cache])
    cache.check_layout(2, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(InvalidArgument, match="KV cache holds"):
        cache.check_layout(2, 8, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(InvalidArgument, match="KV cache holds"):
        cache.check_layout(4, 8, torch.float32, torch.device("cpu"))


def _chunks(prompt: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [prompt[i : i + size] for i in range(0, len(prompt), size)]


def _send_on_new_thread(
    steps: Generator[MoERequest, torch.Tensor, torch.Tensor],
    value: torch.Tensor | None,
    threads: list[threading.Thread],
) -> MoERequest | torch.Tensor:
    """Resume ``steps`` with ``value`` on a fresh thread: the next request, or the returned logits."""
    out: list[MoERequest | torch.Tensor] = []

    def resume() -> None:
        threads.append(threading.current_thread())
        try:
            out.append(steps.send(value))  # type: ignore[arg-type]
        except StopIteration as stop:
            out.append(stop.value)

    thread = threading.Thread(target=resume)
    thread.start()
    thread.join()
    (result,) = out
    return result


def test_resumed_from_a_new_thread_per_step(models: dict[str, Model]) -> None:
    attention, experts = models["qwen2_moe"]
    prompt = _prompt()
    expected = prefill_chunked(attention, experts, prompt, 4)
    cache = KVCache(attention.config.num_layers)
    threads: list[threading.Thread] = []
    for chunk in _chunks(prompt, 4):
        steps = attention.forward_steps([chunk], caches=[cache])
        step = _send_on_new_thread(steps, None, threads)
        while isinstance(step, MoERequest):
            step = _send_on_new_thread(steps, experts(step), threads)
    # every step of every chunk (2 MoE layers + the finish) ran on a thread of its own
    assert len({id(t) for t in threads}) == len(threads) == 3 * len(_chunks(prompt, 4))
    assert threading.main_thread() not in threads
    assert cache.length == LENGTH
    assert isinstance(step, torch.Tensor) and torch.equal(step[0], expected)


@pytest.mark.parametrize("name", ["mixtral-k2-window", "qwen2-k4-shared-kv3"])
def test_chunked_matches_transformers(name: str, tiny_model_factory: Callable[[str], TinyModel]) -> None:
    tiny = tiny_model_factory(name)
    attention, experts = load_model(tiny.path, expert_ranks=2)
    prompt = random_prompt(21, tiny.config.vocab_size, seed=5)  # longer than mixtral's window of 5
    reference = tiny.hf_logits(prompt)
    for chunk_size in (1, 4, 8):
        _assert_close(prefill_chunked(attention, experts, prompt, chunk_size), reference, atol=1e-4)
