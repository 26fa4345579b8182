"""From a ``--model`` value to a model directory and its weights.

A model spec is ``tiny`` (the built-in model, ``asap.model.tiny``), ``random:DIR`` (the architecture of
``DIR/config.json`` with seeded random weights, ``asap.model.random_weights``; nothing but config.json
is read) or the path of a Hugging Face checkpoint directory. ``resolve_model`` turns a spec into the
directory holding config.json; ``open_weights`` gives the tensors of the spec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from asap.errors import CheckpointError
from asap.model.checkpoint import CheckpointReader
from asap.model.config import ModelConfig, load_config
from asap.model.random_weights import RandomTensorSource, init_std_of
from asap.model.tiny import TINY_SPEC, ensure_tiny_model

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
"""``--model random:DIR``: the architecture of ``DIR/config.json`` with seeded random weights
(``asap.model.random_weights``); nothing but config.json is read."""

WeightSource = CheckpointReader | RandomTensorSource
"""What ``open_weights`` yields: both count ``tensors_read`` and ``bytes_read``."""

__all__ = [
    "RANDOM_PREFIX",
    "WeightSource",
    "is_random_spec",
    "model_argument",
    "open_weights",
    "resolve_model",
]


def resolve_model(spec: str | Path) -> Path:
    """``"tiny"`` -> the built-in model (generated if needed); ``"random:DIR"`` -> ``DIR`` (which must hold
    config.json); anything else must be an existing path."""
    if str(spec) == TINY_SPEC:
        return ensure_tiny_model()
    if is_random_spec(spec):
        directory = Path(str(spec)[len(RANDOM_PREFIX) :]).expanduser()
        if not (directory / "config.json").is_file():
            raise CheckpointError(
                f"model {str(spec)!r}: random weights need a directory holding config.json, "
                f"and {str(directory)!r} has none"
            )
        return directory
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {str(spec)!r} is neither {TINY_SPEC!r} nor an existing path")
    return path


def is_random_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names random weights (``random:DIR``) rather than a checkpoint."""
    return isinstance(spec, str) and spec.startswith(RANDOM_PREFIX)


def model_argument(spec: str | Path) -> str:
    """The ``--model`` value to hand to child processes for ``spec``: the built-in model's directory for
    ``tiny`` (generated now, so children never race to create it), ``random:`` + the absolute directory
    for random weights, else the absolute checkpoint path. Raises ``CheckpointError`` like
    ``resolve_model``."""
    path = resolve_model(spec).resolve()
    return f"{RANDOM_PREFIX}{path}" if is_random_spec(spec) else str(path)


@contextmanager
def open_weights(
    spec: str | Path,
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    config: ModelConfig | None = None,
) -> Iterator[WeightSource]:
    """The tensors of model ``spec`` (resolved to ``model_dir`` by ``resolve_model``):
    a ``RandomTensorSource`` generating on ``device`` for ``random:DIR``, else a ``CheckpointReader``
    over ``model_dir``. ``config`` saves re-reading config.json when the caller has it."""
    if is_random_spec(spec):
        model_config = config if config is not None else load_config(model_dir)
        std = init_std_of(model_dir)
        source = RandomTensorSource(model_config, seed=seed, std=std, device=device)
        logger.info(
            "random weights for %s (%s, seed %d, std %g), generated on %s",
            model_dir,
            model_config.model_type,
            seed,
            std,
            source.device,
        )
        with source:
            yield source
    else:
        with CheckpointReader(model_dir) as reader:
            yield reader
