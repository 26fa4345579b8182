"""What a rank builds its model part from, and the one choice between emulated and real compute.

The attention and expert services both turn ``--model``, ``--dtype`` and ``--compute`` into a part the
same way: resolve the model spec, read config.json, and then either build an emulated part (nothing but
config.json is read) or open the weights and load the real one. ``PartSource`` does this once for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from asap.dtypes import torch_dtype
from asap.emulation.profiles import DeviceProfile, parse_compute
from asap.model.config import ModelConfig, load_config
from asap.model.resolve import WeightSource, open_weights, resolve_model

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class PartSource:
    """A rank's model (spec, resolved directory, config), its dtype and its compute backend."""

    model: str
    """The ``--model`` spec as given (``random:DIR`` decides which weights ``open_weights`` yields)."""
    model_dir: Path
    config: ModelConfig
    dtype: torch.dtype
    profile: DeviceProfile | None
    """The emulated device; None for real (torch) compute."""

    @classmethod
    def of(cls, model: str, dtype: str, compute: str) -> PartSource:
        """Resolve ``model``, read its config.json and parse ``dtype`` and ``compute``."""
        model_dir = resolve_model(model)
        return cls(
            model=model,
            model_dir=model_dir,
            config=load_config(model_dir),
            dtype=torch_dtype(dtype),
            profile=parse_compute(compute)[1],
        )

    def load(
        self,
        *,
        device: str,
        emulated: Callable[[DeviceProfile], P],
        real: Callable[[WeightSource], P],
    ) -> P:
        """The part: ``emulated(profile)`` for emulated compute, else ``real(weights)`` with the model's
        weights open on ``device`` (closed again when ``real`` returns)."""
        if self.profile is not None:
            return emulated(self.profile)
        with open_weights(self.model, self.model_dir, device=device, config=self.config) as weights:
            return real(weights)
