"""Lazy, by-name reading of Hugging Face safetensors checkpoints.

Opening a checkpoint reads only the safetensors headers (names, dtypes, shapes, byte ranges); ``get``
reads exactly one tensor's bytes with a positioned read, so an attention rank never pays for expert
weights and ``bytes_read`` counts the payload bytes actually read. Three layouts are understood: a single
``model.safetensors``, shards listed by ``model.safetensors.index.json``, and several ``*.safetensors``
files without an index.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asap.errors import CheckpointError
from asap.model import names as tn
from asap.model.config import ModelConfig
from asap.model.deepseek import deepseek_layer_shapes
from asap.model.weights import ClosingSource

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

# fmt: off
_DTYPES: dict[str, torch.dtype] = {  # safetensors dtype tag -> torch dtype
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# fmt: on


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is, as the safetensors header says."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the payload in ``file``
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header, reading nothing else."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated header "
                    f"(header length {header_len}, file size {size})"
                )
            raw_header = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return {
        name: _parse_entry(path, name, entry, 8 + header_len, size)
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    try:
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from exc
    nbytes = end - begin
    if begin < 0 or nbytes != math.prod(shape) * dtype.itemsize or data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} has byte range [{begin}, {end}) inconsistent with "
            f"shape {list(shape)} {entry['dtype']} or the file size {size} (truncated file?)"
        )
    return TensorInfo(name=name, file=path, dtype=dtype, shape=shape, start=data_start + begin, nbytes=nbytes)


class CheckpointReader(ClosingSource):
    """A ``TensorSource`` over a checkpoint directory (or one ``.safetensors`` file), read lazily by name.

    ``bytes_read`` and ``tensors_read`` account for every ``get``; header reads are not counted.
    Thread-safe: payloads are read with ``os.pread`` on per-file descriptors.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.bytes_read = 0
        self.tensors_read: set[str] = set()
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._closed = False
        self._tensors = self._index(self.path)

    @staticmethod
    def _index(path: Path) -> dict[str, TensorInfo]:
        if path.is_file():
            return _read_header(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        index_path = path / INDEX_FILE
        if index_path.is_file():
            return _read_sharded(path, index_path)
        if (path / SINGLE_FILE).is_file():
            return _read_header(path / SINGLE_FILE)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint {path} holds no *.safetensors file")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"{path}: {name!r} is in both {tensors[name].file} and {file}")
                tensors[name] = info
        return tensors

    def close(self) -> None:
        """Close open file descriptors; safe to call more than once."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, sorted."""
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        """Header information of ``name`` (no payload is read)."""
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}") from None

    def get(
        self, name: str, *, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read tensor ``name``; check its ``shape`` and convert it to ``dtype`` when given."""
        info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} has shape {list(info.shape)}, "
                f"expected {list(shape)}"
            )
        buffer = bytearray(info.nbytes)
        if info.nbytes:
            got = os.preadv(self._fd(info.file), [buffer], info.start)
            if got != info.nbytes:
                raise CheckpointError(f"{info.file}: short read of {name!r} ({got}/{info.nbytes} bytes)")
            tensor = torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)
        else:
            tensor = torch.empty(info.shape, dtype=info.dtype)
        with self._lock:
            self.bytes_read += info.nbytes
            self.tensors_read.add(name)
        return tensor if dtype is None else tensor.to(dtype)

    def _fd(self, file: Path) -> int:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"checkpoint {self.path} is closed")
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{file}: cannot open: {exc}") from exc
            return self._fds[file]


def _read_sharded(directory: Path, index_path: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: malformed index: {exc}") from exc
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, file_name in weight_map.items():
        if file_name not in headers:
            shard = directory / str(file_name)
            if not shard.is_file():
                raise CheckpointError(f"{index_path}: shard {file_name!r} (holding {name!r}) does not exist")
            headers[file_name] = _read_header(shard)
        try:
            tensors[name] = headers[file_name][name]
        except KeyError:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is not in its shard {file_name!r}"
            ) from None
    return tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` must hold, with its shape, in a stable order."""
    c = config
    h, v = c.hidden_size, c.vocab_size
    shapes: dict[str, tuple[int, ...]] = {tn.EMBED: (v, h)}
    for layer in range(c.num_layers):
        if c.mla is not None:
            shapes |= deepseek_layer_shapes(c, layer)
            if c.moe_layers[layer]:
                for e in range(c.num_experts):
                    shapes |= _mlp_shapes(tn.expert(c, layer, e), h, c.expert_intermediate_size)
            continue
        shapes |= _attention_shapes(c, layer)
        if c.moe_layers[layer]:
            shapes[tn.router(c, layer)] = (c.num_experts, h)
            for e in range(c.num_experts):
                shapes |= _mlp_shapes(tn.expert(c, layer, e), h, c.expert_intermediate_size)
            if c.shared_expert_intermediate_size:
                shapes |= _mlp_shapes(tn.shared_expert(c, layer), h, c.shared_expert_intermediate_size)
                shapes[tn.shared_expert_gate(c, layer)] = (1, h)
        else:
            shapes |= _mlp_shapes(tn.dense_mlp(c, layer), h, c.dense_intermediate_size)
    shapes[tn.FINAL_NORM] = (h,)
    if not c.tie_word_embeddings:
        shapes[tn.LM_HEAD] = (v, h)
    return shapes


def _attention_shapes(c: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    # qwen3_moe normalises each head ([head_dim]); olmoe normalises the whole projection.
    q_norm, k_norm = (c.head_dim, c.head_dim) if c.qk_norm == "per_head" else (c.q_size, c.kv_size)
    # fmt: off
    roles: dict[str, tuple[int, ...]] = {
        "input_norm": (h,), "post_attention_norm": (h,),
        "q_proj": (c.q_size, h), "k_proj": (c.kv_size, h), "v_proj": (c.kv_size, h), "o_proj": (h, c.q_size),
        "q_bias": (c.q_size,), "k_bias": (c.kv_size,), "v_bias": (c.kv_size,),
        "q_norm": (q_norm,), "k_norm": (k_norm,),
    }
    # fmt: on
    return {name: roles[role] for role, name in tn.attention(c, layer).items()}


def _mlp_shapes(names: tn.ExpertNames, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    up = (intermediate, hidden)  # gate and up share a shape
    return {names.gate: up, names.up: up, names.down: (hidden, intermediate)}


def check_checkpoint(
    reader: CheckpointReader, config: ModelConfig, names: Iterable[str] | None = None
) -> None:
    """Fail fast: raise one ``CheckpointError`` listing every missing or mis-shaped tensor.

    ``names`` limits the check to the tensors a service will load (default: all that ``config`` needs).
    Only headers are consulted; no payload is read.
    """
    expected = expected_shapes(config)
    wanted = list(expected) if names is None else list(names)
    missing = [n for n in wanted if not reader.has(n)]
    mismatched = [
        f"{n}: expected {list(expected[n])}, found {list(reader.info(n).shape)}"
        for n in wanted
        if n in expected and reader.has(n) and reader.info(n).shape != expected[n]
    ]
    problems = [
        f"{len(items)} {what}: {_abbreviate(items)}"
        for what, items in (("missing tensor(s)", missing), ("shape mismatch(es)", mismatched))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.path} does not match its {config.model_type} config: {'; '.join(problems)}"
        )


def _abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"
