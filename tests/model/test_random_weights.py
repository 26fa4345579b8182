"""Random-weights model source: complete and correctly shaped names, determinism by (seed, name) across
processes, HF-style values, lazy per-rank generation, the ``random:DIR`` spec and ``open_weights``."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asap.errors import CheckpointError
from asap.model import names
from asap.model.attention_part import AttentionPart
from asap.model.checkpoint import CheckpointReader, expected_shapes
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.random_weights import (
    DEFAULT_INIT_STD,
    RandomTensorSource,
    init_std_of,
    tensor_seed,
)
from asap.model.reference import load_model
from asap.model.resolve import model_argument, open_weights, resolve_model
from tests.model.conftest import transformers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_dir(qwen3_dir: Path, tmp_path: Path) -> Path:
    """A directory holding only the tiny qwen3_moe model's config.json (no weights, no tokenizer)."""
    directory = tmp_path / "arch"
    directory.mkdir()
    shutil.copy(qwen3_dir / "config.json", directory / "config.json")
    return directory


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_every_tensor_of_the_config_with_its_shape(config_dir: Path) -> None:
    config = load_config(config_dir)
    source = RandomTensorSource(config)
    shapes = expected_shapes(config)
    assert source.names() == sorted(shapes)
    for name, shape in shapes.items():
        assert source.has(name)
        tensor = source.get(name)
        assert tuple(tensor.shape) == shape and tensor.dtype == torch.float32, name
    assert not source.has("model.layers.0.mlp.experts.99.up_proj.weight")
    with pytest.raises(CheckpointError, match="no tensor"):
        source.get("model.layers.0.mlp.experts.99.up_proj.weight")
    assert source.tensors_read == set(shapes)
    assert source.bytes_read == 4 * sum(math.prod(shape) for shape in shapes.values())


def test_values_are_hf_style_and_deterministic_by_seed_and_name(config_dir: Path) -> None:
    config = load_config(config_dir)
    one, again, other = (RandomTensorSource(config, seed=s, std=0.05) for s in (0, 0, 1))
    embed = one.get(names.EMBED)
    assert torch.equal(embed, again.get(names.EMBED))
    assert not torch.equal(embed, other.get(names.EMBED))
    assert abs(float(embed.std()) - 0.05) < 0.005 and abs(float(embed.mean())) < 0.005
    gate = names.expert(config, 0, 0).gate
    up = names.expert(config, 0, 0).up
    assert not torch.equal(one.get(gate), one.get(up)), "same shape, different names: different values"
    # The order of requests does not matter: each tensor depends on (seed, name) only.
    assert torch.equal(RandomTensorSource(config, std=0.05).get(up), one.get(up))
    norm = names.attention(config, 1)["q_norm"]
    assert torch.equal(one.get(norm), torch.ones(config.head_dim))
    assert torch.equal(one.get(names.FINAL_NORM), torch.ones(config.hidden_size))
    assert tensor_seed(0, gate) != tensor_seed(0, up) != tensor_seed(1, up)


def test_biases_are_zero(qwen2_dir: Path) -> None:
    config = load_config(qwen2_dir)
    assert config.attention_bias
    source = RandomTensorSource(config)
    bias = source.get(names.attention(config, 0)["q_bias"])
    assert bias.shape == (config.q_size,) and not bias.any()


def test_same_weights_in_another_process(config_dir: Path) -> None:
    config = load_config(config_dir)
    name = names.expert(config, 2, 5).down
    script = (
        "import hashlib, sys\n"
        "from asap.model.config import load_config\n"
        "from asap.model.random_weights import RandomTensorSource\n"
        f"t = RandomTensorSource(load_config({str(config_dir)!r}), seed=7).get({name!r})\n"
        "print(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == _digest(RandomTensorSource(config, seed=7).get(name))


def test_an_expert_part_generates_only_its_own_experts(config_dir: Path) -> None:
    config = load_config(config_dir)
    hosted = ExpertPlacement(config.num_experts, 2).experts_of(1)
    source = RandomTensorSource(config)
    part = ExpertPart.from_source(source, config, hosted)
    expected = {
        getattr(names.expert(config, layer, e), role)
        for layer in config.moe_layer_ids
        for e in hosted
        for role in ("gate", "up", "down")
    }
    assert source.tensors_read == expected
    assert source.bytes_read == 4 * sum(math.prod(source.shape(n)) for n in expected)
    layer, e = config.moe_layer_ids[-1], hosted[0]
    i = config.expert_intermediate_size
    assert torch.equal(part.gate_up[-1, 0, :i], source.get(names.expert(config, layer, e).gate))
    assert torch.equal(part.down[-1, 0], source.get(names.expert(config, layer, e).down))


def test_transformers_takes_the_weights_and_agrees_on_the_logits(config_dir: Path, tmp_path: Path) -> None:
    """The names and shapes are the architecture's own: saved as a checkpoint, transformers loads them
    with no missing or unexpected key, and gives the logits our model computes on the same weights."""
    config = load_config(config_dir)
    source = RandomTensorSource(config, seed=3, std=init_std_of(config_dir))
    checkpoint = tmp_path / "materialized"
    checkpoint.mkdir()
    shutil.copy(config_dir / "config.json", checkpoint / "config.json")
    save_file({name: source.get(name) for name in source.names()}, str(checkpoint / "model.safetensors"))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    attention, experts = load_model(f"random:{config_dir}", seed=3)
    prompt = torch.randint(0, config.vocab_size, (11,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf.eval()(input_ids=prompt[None, :]).logits[0, -1].float()
    got = attention.forward([prompt], experts)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_initializer_range_of_the_config(config_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((config_dir / "config.json").read_text())
    assert init_std_of(config_dir) == raw["initializer_range"]
    del raw["initializer_range"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(raw))
    assert init_std_of(bare) == DEFAULT_INIT_STD == 0.02


def test_random_spec_resolves_to_its_config_directory(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(f"random:{config_dir}") == config_dir
    monkeypatch.chdir(config_dir.parent)
    assert resolve_model("random:arch") == Path("arch")
    assert model_argument("random:arch") == f"random:{config_dir.resolve()}"
    assert model_argument(str(config_dir)) == str(config_dir.resolve())
    with pytest.raises(CheckpointError, match=r"random weights need a directory holding config\.json"):
        resolve_model(f"random:{tmp_path / 'missing'}")


def test_open_weights_picks_the_source_by_spec(config_dir: Path, qwen3_dir: Path) -> None:
    with open_weights(f"random:{config_dir}", config_dir) as source:
        assert isinstance(source, RandomTensorSource)
        assert source.device == torch.device("cpu") and source.seed == 0
        assert source.std == init_std_of(config_dir)
    with open_weights(str(qwen3_dir), qwen3_dir) as reader:
        assert isinstance(reader, CheckpointReader)
        assert reader.has(names.EMBED)


def test_reference_on_random_weights_equals_parts_built_from_the_source(config_dir: Path) -> None:
    config = load_config(config_dir)
    attention, experts = load_model(f"random:{config_dir}", expert_ranks=2)
    source = RandomTensorSource(config, std=init_std_of(config_dir))
    direct = AttentionPart.from_source(source, config)
    assert torch.equal(attention.embed, direct.embed)
    assert torch.equal(
        experts.parts[1].gate_up, ExpertPart.from_source(source, config, experts.parts[1].hosted).gate_up
    )
    prompt = list(range(5, 40))
    logits = attention.forward([prompt], experts)[0]
    assert torch.isfinite(logits).all() and float(logits.std()) > 0
