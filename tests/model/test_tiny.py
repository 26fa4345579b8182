"""make_tiny writes checkpoints transformers loads as-is; the built-in model is cached and deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from asap.errors import CheckpointError, InvalidArgument, UnsupportedArchitecture
from asap.model import names as tn
from asap.model import tiny
from asap.model.checkpoint import CheckpointReader, check_checkpoint
from asap.model.config import SUPPORTED_MODEL_TYPES, load_config
from asap.model.resolve import resolve_model
from asap.model.tiny import ensure_tiny_model, make_tiny

transformers = pytest.importorskip("transformers")


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", SUPPORTED_MODEL_TYPES)
def test_transformers_loads_every_arch_without_key_mismatches(tmp_path: Path, arch: str) -> None:
    path = make_tiny(tmp_path / arch, arch=arch, layers=2, experts=4, top_k=2, seed=1)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.config.model_type == arch
    with CheckpointReader(path) as reader:
        assert torch.equal(model.get_input_embeddings().weight.detach(), reader.get(tn.EMBED))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 256, 5]])).logits
    assert logits.shape == (1, 5, 320) and torch.isfinite(logits).all()


# deepseek_v3 has MLA (no kv heads, head_dim is the RoPE width): tests/model/test_deepseek.py
QKV_ARCHS = tuple(arch for arch in SUPPORTED_MODEL_TYPES if arch != "deepseek_v3")


@pytest.mark.parametrize("arch", QKV_ARCHS)
def test_written_config_parses_back(tmp_path: Path, arch: str) -> None:
    path = make_tiny(tmp_path, arch=arch, layers=3, hidden=32, experts=6, top_k=3, heads=2, kv_heads=1)
    cfg = load_config(path)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.top_k) == (
        arch,
        3,
        32,
        6,
        3,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 1, 16)
    assert (cfg.shared_expert_intermediate_size > 0) == (arch == "qwen2_moe")
    with CheckpointReader(path) as reader:
        check_checkpoint(reader, cfg)
        assert all(reader.info(n).dtype == torch.float32 for n in reader.names())
        norm = reader.get(tn.FINAL_NORM)
        weight = reader.get(tn.LM_HEAD)
    assert abs(norm.mean().item() - 1.0) < 0.05 and abs(weight.std().item() - 0.02) < 0.005


def test_weights_are_deterministic_for_the_seed(tmp_path: Path) -> None:
    a = make_tiny(tmp_path / "a", arch="mixtral", layers=1, experts=2, top_k=1, seed=7)
    b = make_tiny(tmp_path / "b", arch="mixtral", layers=1, experts=2, top_k=1, seed=7)
    c = make_tiny(tmp_path / "c", arch="mixtral", layers=1, experts=2, top_k=1, seed=8)
    assert _digest(a) == _digest(b) != _digest(c)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 9}, "top_k=9 exceeds experts=8"),
        ({"hidden": 66}, "hidden=66 is not a multiple of heads=4"),
        ({"heads": 4, "kv_heads": 3}, "heads=4 is not a multiple of kv_heads=3"),
        ({"hidden": 12, "heads": 4}, "head_dim=3 must be even"),
        ({"vocab_size": 100}, "vocab_size=100 is below"),
        ({"layers": 0}, "layers must be positive"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make_tiny(tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_unknown_arch_and_non_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        make_tiny(tmp_path / "x", arch="llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty"):
        make_tiny(tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_ensure_tiny_model_generates_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_tiny_model(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("tiny-qwen3_moe-")
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left behind
    assert first.stat().st_mode == tmp_path.stat().st_mode  # not mkdtemp's owner-only mode
    files = ("config.json", "model.safetensors", "tokenizer.json")
    assert len({(first / f).stat().st_mode for f in files}) == 1
    cfg = load_config(first)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.top_k) == (
        "qwen3_moe",
        4,
        64,
        8,
        2,
    )

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached model was regenerated")

    monkeypatch.setattr(tiny, "make_tiny", fail)
    assert ensure_tiny_model(tmp_path) == first


def test_ensure_tiny_model_is_reproducible_across_caches(tmp_path: Path) -> None:
    a, b = ensure_tiny_model(tmp_path / "one"), ensure_tiny_model(tmp_path / "two")
    assert a.name == b.name and _digest(a) == _digest(b)


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASAP_CACHE_DIR", str(tmp_path / "cache"))
    built_in = resolve_model("tiny")
    assert built_in.parent == tmp_path / "cache" / "models"
    assert json.loads((built_in / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert resolve_model(str(built_in)) == built_in
    with pytest.raises(CheckpointError, match="no-such-model"):
        resolve_model(str(tmp_path / "no-such-model"))
