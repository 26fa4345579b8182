"""Seeded random weights for a model architecture: benchmarking without a checkpoint on disk.

``--model random:DIR`` names the architecture of ``DIR/config.json`` with random weights. A
``RandomTensorSource`` knows every tensor name and shape of the model from its config (the same table a
checkpoint is checked against, ``asap.model.checkpoint.expected_shapes``) and generates each tensor on
demand from ``(seed, name)`` alone, so attention ranks, expert ranks and an in-process reference, each in
its own process, see identical weights, and an expert rank generates only its own experts' tensors.

Values follow the Hugging Face initialisation: matrices N(0, ``initializer_range``) (0.02 unless
config.json says otherwise), RMSNorm weights one, biases zero, so activations stay in range through
every layer in bf16. Tensors are generated float32 on the target device when it is CUDA (fast for tens of
GB of expert weights) and on the CPU otherwise. CPU and CUDA generators draw different numbers for the same
seed: processes must agree on the device type (all CPU or all CUDA) to see the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import torch

from asap.errors import CheckpointError
from asap.model.checkpoint import expected_shapes
from asap.model.config import ModelConfig
from asap.model.weights import ClosingSource

logger = logging.getLogger(__name__)

DEFAULT_INIT_STD = 0.02
"""Standard deviation of random matrices when config.json has no ``initializer_range`` (HF's default)."""

__all__ = [
    "DEFAULT_INIT_STD",
    "RandomTensorSource",
    "init_std_of",
    "tensor_seed",
]


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: a 63-bit hash of ``(seed, name)``, stable across processes
    and Python versions (no ``hash()`` randomisation)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RandomTensorSource(ClosingSource):
    """A ``TensorSource`` of seeded random tensors for every name a checkpoint of ``config`` holds.

    ``get`` generates the tensor (float32) each time it is asked for, so only what is loaded is ever
    produced. ``tensors_read`` and ``bytes_read`` count what was generated (the same accounting as
    ``CheckpointReader``; nothing is read from disk).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        std: float = DEFAULT_INIT_STD,
        device: str | torch.device = "cpu",
    ) -> None:
        if not std > 0:
            raise CheckpointError(f"random weights need a positive standard deviation, got {std}")
        self.config = config
        self.seed = seed
        self.std = std
        target = torch.device(device)
        self.device = target if target.type == "cuda" else torch.device("cpu")
        """Where tensors are generated: the target device when it is CUDA, else the CPU."""
        self.shapes = expected_shapes(config)
        self.bytes_read = 0
        self.tensors_read: set[str] = set()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """All tensor names of the model, sorted."""
        return sorted(self.shapes)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.shapes[name]
        except KeyError:
            raise CheckpointError(
                f"random {self.config.model_type} weights have no tensor {name!r}"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (float32, on ``self.device``): ones for norm weights, zeros for biases, else
        N(0, std) from a generator seeded with ``tensor_seed(seed, name)``."""
        shape = self.shape(name)
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.float32, device=self.device)
        elif name.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.float32, device=self.device)
        else:
            generator = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, name))
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32, device=self.device)
            tensor.mul_(self.std)
        with self._lock:
            self.bytes_read += tensor.numel() * tensor.element_size()
            self.tensors_read.add(name)
        return tensor


def init_std_of(model_dir: str | Path) -> float:
    """``initializer_range`` of ``model_dir``'s config.json, else ``DEFAULT_INIT_STD``."""
    path = Path(model_dir)
    path = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    value = raw.get("initializer_range") if isinstance(raw, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else DEFAULT_INIT_STD
