from __future__ import annotations

import shutil
import time
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from asap.emulation.clock import Sleeper
from asap.emulation.parts import EmulatedAttentionPart, EmulatedExpertPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.attention_part import AttentionPart, MoERequest
from asap.model.checkpoint import CheckpointReader
from asap.model.config import ModelConfig, load_config
from asap.model.expert_part import ExpertPart

H200 = load_profile("h200")


class RecordingSleeper(Sleeper):
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(bias_s=0.0)
        self.calls: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.requested_s += seconds


@pytest.fixture()
def config_only(qwen3_dir: Path, tmp_path: Path) -> ModelConfig:
    shutil.copy(qwen3_dir / "config.json", tmp_path / "config.json")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    return load_config(tmp_path)


def run(part: EmulatedAttentionPart, prompts: list[list[int]]) -> tuple[list[MoERequest], torch.Tensor]:
    requests: list[MoERequest] = []

    def dispatch(request: MoERequest) -> torch.Tensor:
        requests.append(request)
        return torch.empty_like(request.hidden)

    return requests, part.forward(prompts, dispatch)


def test_forward_steps_yields_meta_requests_per_moe_layer(config_only: ModelConfig) -> None:
    sleeper = RecordingSleeper()
    part = EmulatedAttentionPart(config_only, H200, seed=3, sleeper=sleeper)
    requests, logits = run(part, [[1, 2, 3], [4] * 10])
    cfg = config_only
    assert [r.layer for r in requests] == list(cfg.moe_layer_ids)
    for r in requests:
        assert r.hidden.device.type == "meta" and r.hidden.shape == (13, cfg.hidden_size)
        assert r.topk_ids.dtype == torch.int64 and r.topk_ids.shape == (13, cfg.top_k)
        assert int(r.topk_ids.min()) >= 0 and int(r.topk_ids.max()) < cfg.num_experts
        assert all(len(set(row)) == cfg.top_k for row in r.topk_ids.tolist())
        assert r.topk_weights.dtype == torch.float32
        torch.testing.assert_close(r.topk_weights.sum(1), torch.ones(13))
    assert logits.shape == (2, cfg.vocab_size) and logits.dtype == torch.float32 and not logits.any()
    assert sleeper.requested_s == pytest.approx(part.modeled_s([3, 10]))
    assert len(sleeper.calls) == cfg.num_layers + 1


def test_routing_is_deterministic_per_seed_and_call(config_only: ModelConfig) -> None:
    def ids(seed: int, calls: int) -> list[torch.Tensor]:
        part = EmulatedAttentionPart(config_only, H200, seed=seed, sleeper=RecordingSleeper())
        out: list[torch.Tensor] = []
        for _ in range(calls):
            out = [r.topk_ids for r in run(part, [[1] * 64])[0]]
        return out

    first, again, other_seed = ids(1, 1), ids(1, 1), ids(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, ids(1, 2), strict=True))  # the next call differs
    assert not torch.equal(first[0], first[1])  # and so do layers


def test_skew_concentrates_load(config_only: ModelConfig) -> None:
    def top_share(skew: float) -> float:
        part = EmulatedAttentionPart(config_only, H200, seed=0, skew=skew, sleeper=RecordingSleeper())
        request = run(part, [[1] * 2000])[0][0]
        counts = torch.bincount(request.topk_ids.flatten(), minlength=config_only.num_experts)
        return float(counts.max()) / float(counts.sum())

    uniform, skewed = top_share(0.0), top_share(1.5)
    assert uniform < 1.3 / config_only.num_experts
    assert skewed > 1.5 * uniform
    with pytest.raises(InvalidArgument):
        EmulatedAttentionPart(config_only, H200, skew=-1)


def test_sleeps_about_the_modelled_time(config_only: ModelConfig) -> None:
    slow = H200.slowed(100.0)
    part = EmulatedAttentionPart(config_only, slow, seed=0)
    prompts = [[1] * 32, [2] * 16]
    modelled = part.modeled_s([32, 16])
    assert 0.05 < modelled < 0.2
    start = time.perf_counter()
    run(part, prompts)
    elapsed = time.perf_counter() - start
    # Charged exactly the modelled time and never returned early; how late a loaded host wakes it
    # is not bounded here (no timed upper bound).
    assert part.sleeper.requested_s == pytest.approx(modelled)
    assert elapsed >= 0.9 * modelled


def test_validation_matches_the_real_attention_part(qwen3_dir: Path, config_only: ModelConfig) -> None:
    with CheckpointReader(qwen3_dir) as reader:
        real = AttentionPart.from_source(reader, config_only)
    fake = EmulatedAttentionPart(config_only, H200, sleeper=RecordingSleeper())
    for bad in (
        [],
        [[1, 2]],
        [-1],
        [config_only.vocab_size],
        [1.5],
        [0] * (config_only.max_position_embeddings + 1),
    ):
        with pytest.raises(InvalidArgument) as real_err:
            real.validate_prompt(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument) as fake_err:
            fake.validate_prompt(bad)  # type: ignore[arg-type]
        assert str(fake_err.value) == str(real_err.value)
    with pytest.raises(InvalidArgument, match="no prompts"):
        fake.forward_steps([])
    steps: Generator[MoERequest, torch.Tensor, torch.Tensor] = fake.forward_steps([[1, 2]])
    next(steps)
    with pytest.raises(InvalidArgument, match="does not match hidden"):
        steps.send(torch.empty(3, config_only.hidden_size, device="meta"))


def test_expert_part_counts_rows_and_returns_meta(config_only: ModelConfig) -> None:
    sleeper = RecordingSleeper()
    part = EmulatedExpertPart(config_only, [1, 3], H200, sleeper=sleeper)
    ids = torch.tensor([[1, 3], [1, -1], [0, 1]])  # 0 is hosted elsewhere: invalid
    hidden = torch.empty((3, config_only.hidden_size), device="meta", dtype=torch.bfloat16)
    with pytest.raises(InvalidArgument, match="not hosted"):
        part.compute(config_only.moe_layer_ids[0], hidden, ids, torch.ones(3, 2))
    ids[2, 0] = -1
    out = part.compute(config_only.moe_layer_ids[0], hidden, ids, torch.ones(3, 2))
    assert out.device.type == "meta" and out.shape == (3, config_only.hidden_size)
    assert part.rows_per_expert(ids) == [3, 1]
    assert sleeper.calls == [part.call_s(ids)] and sleeper.calls[0] > 0
    assert part.emulated and part.hosted == (1, 3)


def test_expert_validation_matches_the_real_part(qwen3_dir: Path, config_only: ModelConfig) -> None:
    with CheckpointReader(qwen3_dir) as reader:
        real = ExpertPart.from_source(reader, config_only, [1, 3])
    fake = EmulatedExpertPart(config_only, [3, 1], H200, sleeper=RecordingSleeper())
    h = config_only.hidden_size
    dense = [i for i in range(config_only.num_layers) if i not in config_only.moe_layer_ids]
    cases = [
        (config_only.num_layers, torch.zeros(1, h), torch.tensor([[1, 3]]), torch.ones(1, 2)),
        (config_only.moe_layer_ids[0], torch.zeros(1, h + 1), torch.tensor([[1, 3]]), torch.ones(1, 2)),
        (config_only.moe_layer_ids[0], torch.zeros(1, h), torch.tensor([[2, 3]]), torch.ones(1, 2)),
        (config_only.moe_layer_ids[0], torch.zeros(2, h), torch.tensor([[1, 3]]), torch.ones(1, 2)),
    ] + [(d, torch.zeros(1, h), torch.tensor([[1, 3]]), torch.ones(1, 2)) for d in dense]
    for layer, hidden, ids, weights in cases:
        with pytest.raises(InvalidArgument) as real_err:
            real.compute(layer, hidden, ids, weights)
        with pytest.raises(InvalidArgument) as fake_err:
            fake.compute(layer, hidden, ids, weights)
        assert str(fake_err.value) == str(real_err.value)


def test_chunked_prefill_advances_the_cache(config_only: ModelConfig) -> None:
    kvcache = pytest.importorskip("asap.model.kvcache")
    sleeper = RecordingSleeper()
    part = EmulatedAttentionPart(config_only, replace(H200, launch_us=0.0), sleeper=sleeper)
    cache = kvcache.KVCache(config_only.num_layers)
    part.forward([[1] * 40], lambda r: torch.empty_like(r.hidden), caches=[cache])
    assert cache.length == 40
    first = sleeper.requested_s
    part.forward([[1] * 40], lambda r: torch.empty_like(r.hidden), caches=[cache])
    assert cache.length == 80 and sleeper.requested_s - first > first  # the second chunk also attends to 40
    with pytest.raises(InvalidArgument):
        part.forward_steps([[1], [2]], caches=[cache, cache])


def test_expert_validation_of_out_of_range_ids_matches_the_real_part(
    qwen3_dir: Path, config_only: ModelConfig
) -> None:
    """The one numpy pass that validates and counts gives the real part's errors for ids out of range,
    below -1 and of the wrong dtype too."""
    with CheckpointReader(qwen3_dir) as reader:
        real = ExpertPart.from_source(reader, config_only, [1, 3])
    fake = EmulatedExpertPart(config_only, [3, 1], H200, sleeper=RecordingSleeper())
    h, e, layer = config_only.hidden_size, config_only.num_experts, config_only.moe_layer_ids[0]
    cases = [
        torch.tensor([[1, e]]),
        torch.tensor([[-2, 3]]),
        torch.tensor([[e + 5, 0], [1, -3]]),
        torch.tensor([[1.0, 3.0]]),
        torch.tensor([[True, False]]),
    ]
    for ids in cases:
        with pytest.raises(InvalidArgument) as real_err:
            real.compute(layer, torch.zeros(ids.shape[0], h), ids, torch.ones(ids.shape))
        with pytest.raises(InvalidArgument) as fake_err:
            fake.compute(layer, torch.zeros(ids.shape[0], h), ids, torch.ones(ids.shape))
        assert str(fake_err.value) == str(real_err.value)
    out = fake.compute(
        layer, torch.zeros(2, h), torch.tensor([[1, -1], [3, 1]], dtype=torch.int32), torch.ones(2, 2)
    )
    assert out.shape == (2, h) and fake.rows_per_expert(torch.tensor([[1, -1], [3, 1]])) == [2, 1]


class BeginRecordingSleeper(RecordingSleeper):
    """Records each ``begin``: whether it asked to keep a pending one, and whether one was pending."""

    def __init__(self) -> None:
        super().__init__()
        self.begins: list[tuple[bool, bool]] = []
        self.pending = False

    def begin(self, *, keep_pending: bool = False) -> None:
        self.begins.append((keep_pending, self.pending))
        self.pending = True

    def sleep(self, seconds: float) -> None:
        self.pending = False
        super().sleep(seconds)


def test_inputs_ready_starts_the_next_layers_modelled_time(config_only: ModelConfig) -> None:
    assert all(config_only.moe_layers)
    sleeper = BeginRecordingSleeper()
    part = EmulatedAttentionPart(config_only, H200, seed=0, sleeper=sleeper)
    gen = part.forward_steps([[1, 2, 3]])
    request = next(gen)
    assert sleeper.begins == [(False, False)]  # the first layer starts its own clock
    assert sleeper.calls == []  # the MoE layer's modelled time ends in ``finish``, not before the yield
    request.finish()
    request.finish()  # once
    assert len(sleeper.calls) == 1
    part.inputs_ready()  # the caller took the results and combines them
    request = gen.send(torch.empty_like(request.hidden))
    # the next layer keeps the caller's begin: its modelled time counts from the results' take
    assert sleeper.begins == [(False, False), (False, False), (True, True)]
    request.finish()
    assert len(sleeper.calls) == 2  # the full modelled time of both layers is charged


def test_router_takes_the_same_rows_as_gathering_through_the_layer_permutation(
    config_only: ModelConfig,
) -> None:
    """The per-layer pools computed once give what the two gathers per call gave: the same ids and
    weights, dtypes and shapes, for every MoE layer and the same generator state."""
    from asap.emulation.routing import RandomRouter

    router = RandomRouter(config_only, seed=3, skew=0.5, pool_rows=64)
    for layer in config_only.moe_layer_ids:
        g_new, g_old = torch.Generator().manual_seed(layer), torch.Generator().manual_seed(layer)
        ids, weights = router.route(layer, 37, g_new)
        rows = torch.randint(64, (37,), generator=g_old)
        expected_ids = router._expert_of_rank[layer][router._pool_ids[rows]]
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        assert ids.shape == (37, config_only.top_k) and weights.shape == (37, config_only.top_k)
        assert torch.equal(ids, expected_ids)
        assert torch.equal(weights, router._pool_weights[rows])
        assert all(len(set(row)) == config_only.top_k for row in ids.tolist())


def test_expert_rows_counted_alike_with_and_without_empty_slots_and_for_int32_ids(
    config_only: ModelConfig,
) -> None:
    """The count without masking (no -1 slot) and the numpy read of int32 / int64 CPU ids give what the
    masked count of int64 ids gives."""
    part = EmulatedExpertPart(config_only, [1, 3], H200, sleeper=RecordingSleeper())
    hidden = torch.empty((3, config_only.hidden_size), device="meta", dtype=torch.bfloat16)
    weights = torch.ones(3, 2)
    full = torch.tensor([[1, 3], [3, 3], [1, 1]])
    with_empty = torch.tensor([[1, 3], [3, -1], [-1, 1]])
    for ids, expected in ((full, [3, 3]), (with_empty, [2, 2])):
        for dtype in (torch.int64, torch.int32):
            typed = ids.to(dtype)
            assert part.checked_rows_per_expert(hidden, typed, weights) == expected
            assert part.rows_per_expert(typed) == expected
        assert part.checked_rows_per_expert(hidden, ids.t().contiguous().t(), weights) == expected


def test_expert_part_sleeps_the_modelled_call_of_every_routing(config_only: ModelConfig) -> None:
    """The modelled time comes from two totals, cached per pair: each call still sleeps exactly what
    ``costs.expert_call_s`` gives for its rows per hosted expert (repeated and new pairs alike)."""
    from asap.emulation import costs
    from asap.emulation.parts import H200_LAUNCH_US, PER_LAYER_CALL_OVERHEAD_S

    sleeper = RecordingSleeper()
    hosted = list(range(0, config_only.num_experts, 2))
    part = EmulatedExpertPart(config_only, hosted, H200, sleeper=sleeper)
    hidden = torch.empty((4, config_only.hidden_size), device="meta", dtype=torch.bfloat16)
    layer = config_only.moe_layer_ids[0]
    k = config_only.top_k
    draws = [
        torch.tensor([[hosted[0]] * k] * 4),
        torch.tensor([[hosted[1]] * k] * 4),  # same totals as the first: the cached pair
        torch.tensor([[hosted[i % len(hosted)] for i in range(r, r + k)] for r in range(4)]),
        torch.full((4, k), -1),
    ]
    for ids in draws:
        sleeper.calls.clear()
        part.compute(layer, hidden, ids, torch.ones(4, k))
        expected = costs.expert_call_s(part.rows_per_expert(ids), part.config, part.profile, 2)
        extra = 0.0 if part.layer_agnostic else PER_LAYER_CALL_OVERHEAD_S * H200.launch_us / H200_LAUNCH_US
        assert sleeper.calls == [expected + extra]


def test_expert_inputs_ready_starts_the_next_calls_modelled_time_once(config_only: ModelConfig) -> None:
    t = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        t[0] += seconds

    sleeper = Sleeper(bias_s=0.0, clock=lambda: t[0], sleep=sleep)
    part = EmulatedExpertPart(config_only, [1, 3], H200, sleeper=sleeper)
    ids = torch.tensor([[1, 3], [3, 1]], dtype=torch.int32)
    weights = torch.full((2, 2), 0.5)
    hidden = torch.empty(2, config_only.hidden_size, device="meta")
    modelled = part.call_s(ids)
    part.inputs_ready(t[0])
    t[0] += modelled / 4  # the lane's descriptor work after the take
    part.compute(0, hidden, ids, weights)
    assert slept == [pytest.approx(modelled * 3 / 4)]  # counted from the take; the full time charged
    part.compute(0, hidden, ids, weights)  # the start was used: the next call counts from its own
    assert slept[1] == pytest.approx(modelled)
    part.inputs_ready(t[0])
    part.inputs_ready(None)  # forgotten (the computation never came)
    t[0] += modelled / 4
    part.compute(0, hidden, ids, weights)
    assert slept[2] == pytest.approx(modelled)


def test_skewed_routers_share_the_models_hot_experts_and_uniform_ones_keep_their_own(
    config_only: ModelConfig,
) -> None:
    """With skew the layer's hot set is the model's: every attention rank's router prefers the same
    experts, so the load an expert rank sums over attention ranks stays unbalanced; uniform routers keep
    their own per-rank relabelling (the draws of earlier trees)."""
    from asap.emulation.routing import RandomRouter, hot_sets

    layers = config_only.moe_layer_ids
    skewed = [RandomRouter(config_only, seed=s, skew=1.0) for s in range(4)]
    for layer in layers:
        assert all(torch.equal(r._expert_of_rank[layer], hot_sets(config_only)[layer]) for r in skewed)
    assert not torch.equal(hot_sets(config_only)[layers[0]], hot_sets(config_only)[layers[1]])
    uniform = [RandomRouter(config_only, seed=s, skew=0.0) for s in range(2)]
    assert not torch.equal(uniform[0]._expert_of_rank[layers[0]], uniform[1]._expert_of_rank[layers[0]])
    again = RandomRouter(config_only, seed=0, skew=0.0)  # its own stream, reproducible
    assert all(torch.equal(uniform[0]._expert_of_rank[x], again._expert_of_rank[x]) for x in layers)

    def summed_top_share(routers: list[RandomRouter]) -> float:
        counts = torch.zeros(config_only.num_experts, dtype=torch.int64)
        for i, router in enumerate(routers):
            ids, _ = router.route(layers[0], 512, torch.Generator().manual_seed(i))
            counts += torch.bincount(ids.flatten(), minlength=config_only.num_experts)
        return float(counts.max()) / float(counts.sum())

    uniform4 = [RandomRouter(config_only, seed=s, skew=0.0) for s in range(4)]
    assert summed_top_share(skewed) > 2 * summed_top_share(uniform4)
