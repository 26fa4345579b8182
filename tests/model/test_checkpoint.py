"""CheckpointReader: lazy reads with exact byte accounting, the three layouts, and clear failures."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asap.errors import CheckpointError
from asap.model import names as tn
from asap.model.checkpoint import CheckpointReader, check_checkpoint, expected_shapes
from asap.model.config import load_config
from asap.model.tiny import make_tiny


def _tensors(count: int = 10) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64, 32 + i, generator=gen) for i in range(count)}


@pytest.fixture
def single(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors() | {"half": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_lazy_reads_count_exact_payload_bytes(single: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = single
    with CheckpointReader(path) as reader:
        assert reader.bytes_read == 0 and reader.tensors_read == set()  # opening reads headers only
        a, b = reader.get("t3"), reader.get("t7")
        assert torch.equal(a, tensors["t3"]) and torch.equal(b, tensors["t7"])
        expected = tensors["t3"].nbytes + tensors["t7"].nbytes
        assert reader.bytes_read == expected
        assert expected * 4 < (path / "model.safetensors").stat().st_size
        assert reader.tensors_read == {"t3", "t7"}
        assert reader.names() == sorted(tensors)


def test_get_checks_shape_and_converts_dtype(single: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = single
    with CheckpointReader(path) as reader:
        half = reader.get("half", shape=(3, 4), dtype=torch.float32)
        assert half.dtype == torch.float32 and torch.equal(half, tensors["half"].float())
        assert reader.info("half").dtype == torch.bfloat16
        with pytest.raises(CheckpointError, match=r"'t1' has shape \[64, 33\], expected \[64, 32\]"):
            reader.get("t1", shape=(64, 32))


def test_missing_tensor_names_tensor_and_checkpoint(single: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = single
    with CheckpointReader(path) as reader:
        assert not reader.has("nope")
        with pytest.raises(CheckpointError, match="nope") as info:
            reader.get("nope")
        assert str(path) in str(info.value)


def test_close_is_idempotent_and_final(single: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = single
    reader = CheckpointReader(path)
    reader.get("t0")
    reader.close()
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader.get("t1")


def test_sharded_index(tmp_path: Path) -> None:
    tensors = _tensors(6)
    shards = {
        "model-00001-of-00002.safetensors": ["t0", "t1", "t2"],
        "model-00002-of-00002.safetensors": ["t3"],
    }
    for file, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(tmp_path / file))
    weight_map = {n: file for file, names in shards.items() for n in names}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    # Not in the index, so not part of the checkpoint even though a file holds it.
    save_file({"t5": tensors["t5"]}, str(tmp_path / "stray.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["t0", "t1", "t2", "t3"]
        assert torch.equal(reader.get("t3"), tensors["t3"]) and torch.equal(reader.get("t1"), tensors["t1"])
        assert reader.bytes_read == tensors["t3"].nbytes + tensors["t1"].nbytes
        assert not reader.has("t5")


def test_index_pointing_at_missing_shard_or_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"s2\.safetensors"):
        CheckpointReader(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="'c' is not in its shard"):
        CheckpointReader(tmp_path)


def test_several_files_without_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, str(tmp_path / "part-a.safetensors"))
    save_file({"b": torch.full((2, 2), 2.0)}, str(tmp_path / "part-b.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == ["a", "b"]
        assert reader.get("b").sum().item() == 8.0 and reader.bytes_read == 16
    save_file({"a": torch.ones(1)}, str(tmp_path / "part-c.safetensors"))
    with pytest.raises(CheckpointError, match="'a' is in both"):
        CheckpointReader(tmp_path)


def test_empty_or_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no \\*\\.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "absent")


@pytest.mark.parametrize(
    "case", ["not safetensors", "short", "truncated header", "header not json", "truncated data"]
)
def test_corrupt_files(tmp_path: Path, single: tuple[Path, dict[str, torch.Tensor]], case: str) -> None:
    path, _ = single
    good = (path / "model.safetensors").read_bytes()
    payload = {
        "not safetensors": b"this is a text file, not tensors",
        "short": b"abc",
        "truncated header": good[:100],
        "header not json": struct.pack("<Q", 4) + b"\xff\xfe{[",
        "truncated data": good[: len(good) - 100],
    }[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*(not a safetensors|truncated)"):
        CheckpointReader(bad)


def test_header_with_inconsistent_offsets(tmp_path: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="inconsistent with shape"):
        CheckpointReader(bad)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "qwen2", arch="qwen2_moe", layers=2, experts=4)


def test_expected_shapes_match_a_full_checkpoint(tiny_dir: Path) -> None:
    config = load_config(tiny_dir)
    shapes = expected_shapes(config)
    with CheckpointReader(tiny_dir) as reader:
        assert set(shapes) == set(reader.names())
        assert all(reader.info(n).shape == s for n, s in shapes.items())
        check_checkpoint(reader, config)
        assert reader.bytes_read == 0  # validation reads headers only
    assert shapes[tn.shared_expert_gate(config, 1)] == (1, config.hidden_size)
    assert shapes[tn.expert(config, 0, 3).down] == (config.hidden_size, config.expert_intermediate_size)


def test_check_checkpoint_lists_missing_and_mismatched(tiny_dir: Path, tmp_path: Path) -> None:
    config = load_config(tiny_dir)
    with CheckpointReader(tiny_dir) as reader:
        tensors = {n: reader.get(n) for n in reader.names()}
    router = tn.router(config, 1)
    gone = tn.expert(config, 1, 2).up
    del tensors[gone]
    tensors[router] = torch.zeros(5, config.hidden_size)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(CheckpointError) as info:
            check_checkpoint(reader, config)
        message = str(info.value)
        assert gone in message and router in message and "expected [4, 64], found [5, 64]" in message
        # A service that needs only layer 0 is unaffected.
        check_checkpoint(reader, config, names=[tn.router(config, 0), tn.EMBED])
        with pytest.raises(CheckpointError, match="1 missing"):
            check_checkpoint(reader, config, names=[gone, tn.EMBED])
